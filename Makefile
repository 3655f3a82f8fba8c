# make native: build/libspikec_kernels.so, the optional native kernels of the spikec ops
# (runtime/kernels/build.sh: downloads the onnxruntime C/C++ headers from Debian once, no root needed).
.PHONY: native clean-native

native:
	bash runtime/kernels/build.sh

clean-native:
	rm -rf build/libspikec_kernels.so build/ort-headers

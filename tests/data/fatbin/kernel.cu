// A one-kernel CUDA library for tests/test_upstream.py: its .nv_fatbin is what the wheel-facts reader parses.
__global__ void twice(float *x) { x[threadIdx.x] *= 2.0f; }
extern "C" void launch_twice(float *x) { twice<<<1, 32>>>(x); }

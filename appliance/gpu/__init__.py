"""GPU support: a CUDA layer on cuda-python (``cuda``) and NVML telemetry (``nvml``).

Both import cleanly on machines without a GPU, a driver or the optional packages (extra ``gpu``):
every entry point reports the absence as data instead of raising at import time.
"""

from appliance.gpu.cuda import CudaError, DeviceInfo, GpuProbe, probe

__all__ = ["CudaError", "DeviceInfo", "GpuProbe", "probe"]

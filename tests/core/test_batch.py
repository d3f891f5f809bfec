"""Which errors end a folder run (a lost device or disk) and which lose only one file."""

import errno

import pytest
import torch

from osediff.core.batch import device_lost


@pytest.mark.parametrize("e", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                               RuntimeError("CUDA error: device-side assert triggered"),
                               RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
                               RuntimeError("CUDA error: uncorrectable ECC error encountered"),
                               OSError(errno.ENOSPC, "No space left on device"),
                               OSError(errno.EROFS, "Read-only file system")])
def test_lost_devices_end_the_run(e):
    assert device_lost(e)


@pytest.mark.parametrize("e", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                               RuntimeError("CUDA error: out of memory"),
                               RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"),
                               MemoryError(), RuntimeError("boom"), ValueError("odd size"),
                               OSError(errno.EACCES, "Permission denied"), ZeroDivisionError()])
def test_everything_else_is_one_files_failure(e):
    assert not device_lost(e)

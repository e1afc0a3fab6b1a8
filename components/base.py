"""What every tailor component shares: the image it runs in and the decorator that builds it.

Components are KFP *lightweight Python components*: the function body is embedded in the compiled
pipeline and executed inside the tailor image, where the `tailor` package (and kfp, one of its
pinned dependencies) is already installed, so nothing is pip-installed when a pod starts.
"""
from __future__ import annotations

import functools
import os
from importlib.metadata import version

from kfp import dsl

from components import runtime

_TAG = version("tailor")
# The images built from containers/ (see containers/README.md). These names are the defaults of
# the pipeline's `image` / `gpu_image` parameters; TAILOR_IMAGE / TAILOR_GPU_IMAGE override them
# when a pipeline is compiled for a particular registry.
DEFAULT_IMAGE = f"tailor:{_TAG}-cpu"
DEFAULT_GPU_IMAGE = f"tailor:{_TAG}-cuda"
IMAGE = os.environ.get("TAILOR_IMAGE") or DEFAULT_IMAGE
GPU_IMAGE = os.environ.get("TAILOR_GPU_IMAGE") or DEFAULT_GPU_IMAGE

RUNTIME_FUNCS = [runtime.load_params, runtime.log_metrics, runtime.work_dir, runtime.check_placement,
                 runtime.scoped_repo_url]

# install_kfp_package=False: the image already has the pinned kfp, and pods may have no network.
# The pipeline sets each task's image (CPU or CUDA) from its `image` / `gpu_image` parameters.
tailor_component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False,
                                     additional_funcs=RUNTIME_FUNCS)

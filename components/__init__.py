"""Kubeflow Pipelines components: one per pipeline stage, each a thin call into `tailor.stages`.

To add a stage: write components/<stage>.py (inputs/outputs as typed KFP artifacts, params as the
`params_yaml` string loaded with `load_params(params_yaml, "<stage>")`, body = one call into
tailor.stages), export it here, add its output to split_params, list its params in dvc.yaml, and
wire it in pipelines/tailor_pipeline.py (one STEPS entry + the call in the DAG).
"""
from components.base import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE, GPU_IMAGE, IMAGE
from components.export import export
from components.prepare_data import prepare_data
from components.profile_latency import profile_latency
from components.report import report
from components.retrain import retrain
from components.retrain_scenarios import retrain_scenarios
from components.search_collect import search_collect
from components.search_evolution import search_evolution
from components.search_generator import search_generator
from components.search_nsga2 import search_nsga2
from components.search_predictor import search_predictor
from components.search_random import search_random
from components.search_superclasses import search_superclasses
from components.serve_check import serve_check
from components.split_params import split_params
from components.train_job import train_supernet_job, train_teacher_job
from components.train_stock import train_stock
from components.train_supernet import train_supernet
from components.train_teacher import train_teacher

__all__ = ["DEFAULT_GPU_IMAGE", "DEFAULT_IMAGE", "GPU_IMAGE", "IMAGE", "export", "prepare_data", "profile_latency",
           "report", "retrain", "retrain_scenarios", "search_collect", "search_evolution", "search_generator", "search_nsga2", "search_predictor",
           "search_random", "search_superclasses", "serve_check", "split_params", "train_stock", "train_supernet", "train_supernet_job",
           "train_teacher", "train_teacher_job"]

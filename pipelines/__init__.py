"""The tailor DAG on Kubeflow Pipelines v2: pipeline definition, compile and local-run helpers."""

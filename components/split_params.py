from typing import NamedTuple

from components.base import tailor_component

# One output per step that takes params, named after the step ('-' -> '_') and listed in alphabetical
# order: the body returns them sorted by name, and the pipeline checks the names against its steps.
# Spelt out in the signature, not built from a list: the pod runs this function's source alone.
@tailor_component
def split_params(params_yaml: str, steps_json: str) -> NamedTuple("StepParams", [
        ("export", str), ("prepare_data", str), ("profile_latency", str), ("report", str), ("retrain", str),
        ("retrain_scenarios", str), ("search_collect", str), ("search_evolution", str), ("search_generator", str),
        ("search_nsga2", str), ("search_predictor", str), ("search_random", str), ("search_superclasses", str),
        ("serve_check", str), ("train_stock", str), ("train_supernet", str), ("train_teacher", str)]):
    """split-params: the run's params validated once, cross-field rules included (so a bad run stops
    here, naming the field), then for each step of steps_json ({step: the params keys it declares})
    a YAML holding only those keys. A step's cache key then changes only with what it reads."""
    import json

    import yaml

    from tailor.config import parse_params_yaml
    from tailor.config import split_params as split

    source = "pipeline parameter params_yaml"
    parts = split(parse_params_yaml(params_yaml, source), json.loads(steps_json), source)
    named = {step.replace("-", "_"): yaml.safe_dump(part, sort_keys=False) for step, part in parts.items()}
    return tuple(named[name] for name in sorted(named))

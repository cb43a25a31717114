"""Pure per-iteration and routing decisions (no Ray, no clock, no I/O).

Routers, iteration policies, controllers, dispatchers and length predictors live in the modules
here; ``hybrid_ray.schedulers`` puts them together into a named policy's bundle, and
``hybrid_ray.knobs`` holds the knobs a cluster YAML may set. This package imports none of them.
"""

"""hybrid-ray: hybrid offline-online scheduling of LLM inference over Ray replicas."""
__version__ = "0.1.0"

"""Where training runs: the executor seam (`base.py`), its kinds (`local.py`, `ray.py`) and the
registry that picks one from `FACTORY_EXECUTOR` (`registry.py`)."""

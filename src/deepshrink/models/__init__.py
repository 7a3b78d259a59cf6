"""The model zoo and loading of user models and checkpoints."""
from deepshrink.models.loading import load, record_loader, save_checkpoint
from deepshrink.models.zoo import ZOO, create

__all__ = ["ZOO", "create", "load", "record_loader", "save_checkpoint"]

"""servegrid's Python client: typed tensors in and out, credentials, deadlines and safe retries."""

from servegrid_sdk.client import ServegridClient, ServegridError
from servegrid_sdk.tensors import from_tensor, to_tensor

__all__ = ["ServegridClient", "ServegridError", "from_tensor", "to_tensor"]

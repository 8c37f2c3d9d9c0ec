"""servegrid's Python client: typed tensors in and out, credentials, deadlines and safe retries."""

from servegrid_sdk.aio import AsyncApiKeyCredential, AsyncServegridClient
from servegrid_sdk.client import ApiKeyCredential, ServegridClient, ServegridError
from servegrid_sdk.tensors import from_tensor, to_tensor

__all__ = [
    "ApiKeyCredential",
    "AsyncApiKeyCredential",
    "AsyncServegridClient",
    "ServegridClient",
    "ServegridError",
    "from_tensor",
    "to_tensor",
]

"""vLLM's runtime LoRA updating: POST /v1/load_lora_adapter and /v1/unload_lora_adapter, served
when the app's `allow_runtime_lora_updating` is set (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING).

An adapter loaded at runtime is a symbolic link in the app's `lora_dir`, named by the adapter.
Every ingress replica then accepts the name and lists it, and every engine replica loads it on
a request's first use, as it does the directory's own adapters (at most `max_loras` kept).
Unloading removes the link: ingress replicas refuse the name from then on, and the engines
let the adapter go as they do any least recently used one. An engine that holds an adapter
whose link now points elsewhere (`load_inplace`) loads the new one (engine/lora.py).
Adapters the configuration names (`lora_modules`, or real folders of `lora_dir`) stay.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from app.protocol import APIError
from engine.config import NAME_MAX, is_folder_name
from engine.lora import LoRAError, read_config


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter loaded at runtime under this name


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names are what identify adapters here


def load_adapter(lora_dir: str, configured: set[str], req: LoadLoRAAdapterRequest) -> str:
    """Link the adapter into lora_dir -> vLLM's success text; APIError otherwise."""
    name = req.lora_name
    link = _runtime_link(lora_dir, name, configured, "replaced")
    path = Path(req.lora_path).expanduser().absolute()
    try:
        read_config(name, path)  # a plain LoRA's PEFT directory; its weights load on first use
    except (LoRAError, OSError, ValueError) as e:
        raise APIError(400, str(e), "lora_path") from e
    try:
        if req.load_inplace:  # atomically: a request reads the old adapter or the new one
            spare = link.with_name(f".{name}.{uuid.uuid4().hex}")
            spare.symlink_to(path, target_is_directory=True)
            os.replace(spare, link)
        else:
            link.symlink_to(path, target_is_directory=True)  # fails if another got there first
    except FileExistsError:
        raise APIError(
            400,
            f"The lora adapter '{name}' has already been loaded. If you want to load the "
            "adapter in place, set 'load_inplace' to True.",
            "lora_name",
        ) from None
    except OSError as e:  # lora_dir read-only, say: the server's, not the request's, fault
        message = f"could not link the adapter into {lora_dir}: {e}"
        raise APIError(500, message, kind="server_error") from e
    return f"Success: LoRA adapter '{name}' added successfully."


def unload_adapter(lora_dir: str, configured: set[str], req: UnloadLoRAAdapterRequest) -> str:
    """Remove the adapter's link -> vLLM's success text; APIError otherwise."""
    name = req.lora_name
    link = _runtime_link(lora_dir, name, configured, "unloaded")
    try:
        link.unlink()
    except FileNotFoundError:
        raise APIError(
            404, f"The lora adapter '{name}' cannot be found.", "lora_name", "not_found_error"
        ) from None
    return f"Success: LoRA adapter '{name}' removed successfully."


def _runtime_link(lora_dir: str, name: str, configured: set[str], verb: str) -> Path:
    """Where adapter `name`'s link lives; a 400 for a name that is not one plain folder's, or
    for an adapter of the configuration (lora_modules, a real folder of lora_dir)."""
    if not is_folder_name(name) or name.startswith("."):
        message = f"lora_name {name!r} must name one folder (no '/' or NUL, not hidden, at most "
        raise APIError(400, message + f"{NAME_MAX} bytes)", "lora_name")
    link = Path(lora_dir) / name
    if name in configured or (link.exists() and not link.is_symlink()):
        message = f"The lora adapter {name!r} is part of the configuration; it cannot be {verb}"
        raise APIError(400, message, "lora_name")
    return link

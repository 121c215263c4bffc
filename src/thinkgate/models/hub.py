"""Fetch a Hugging Face hub repo into the local cache."""

from __future__ import annotations

from pathlib import Path


class ModelNotFoundError(ValueError):
    """The model spec names nothing we can load."""


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"],
        )
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"hub repository {repo_id!r} does not exist or is private") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub to fetch {repo_id!r}, and it is not in the local cache "
            f"(set HF_ENDPOINT or copy the model to a directory and pass its path)") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"could not fetch {repo_id!r} from the Hugging Face hub: {e}") from e
    return Path(path)

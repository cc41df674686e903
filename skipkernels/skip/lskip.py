"""LSkip: the frozen prefix (stem + blocks [0, ω), ω = ``skip_layers``) of both towers, computed once and cached.

Text prompts are deterministic, so their prefix tokens are computed once per run (the paper's
code recomputed them every epoch). Images are augmented, so every epoch each augmented training
image goes through the image prefix once, without autograd, and its tokens at block omega are
kept for that epoch's steps.

Quirk fixed here: with token dropping the reference code could drop the class token; we keep
it always and drop only patch tokens.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from skipkernels.skip.towers import truncated_length


PROMPT_CHUNK = 1024  # prompts per pass through the text tower at set-up: bounded memory at any class count


class TextPrefixCache:
    """Text tokens at block omega for every class prompt, truncated to the longest prompt."""

    @torch.no_grad()
    def __init__(self, text, tokens: torch.Tensor, skip_layers: int, dtype: torch.dtype, truncate: bool = True,
                 each_chunk=None):
        """``text``: the model's ``TextPlan`` (``skipkernels.skip.towers``). The prompts go through
        blocks [0, omega) ``PROMPT_CHUNK`` at a time, so the activations
        held at once do not grow with the class count. ``each_chunk(x, pool_index)``, when given,
        receives each chunk's tokens at block omega in the model's compute dtype, before the cast
        to ``dtype``, and the chunk's pool positions."""
        self.tokens = tokens
        self.pool_index = text.pool_index(tokens)
        self.pool_index_host = self.pool_index.cpu()
        self.truncate = truncate
        length = truncated_length(self.pool_index_host, tokens.shape[1]) if truncate else tokens.shape[1]
        chunk_size = PROMPT_CHUNK
        count = tokens.shape[0]
        store = None
        for start in range(0, max(count, 1), chunk_size):  # no prompts: one empty pass, an empty cache
            rows = slice(start, min(start + chunk_size, count))
            x = text.blocks_between(text.embed(tokens[rows, :length]), 0, skip_layers)
            if store is None:
                store = torch.empty((count, *x.shape[1:]), dtype=dtype, device=x.device)
            store[rows] = x  # cast to the cache's dtype here
            if each_chunk is not None:
                each_chunk(x, self.pool_index[rows])
        self.tokens_at_block = store

    def length_for(self, selected_host: torch.Tensor | None) -> int:
        # All classes: the cache is already truncated to their longest prompt. A constant, so the
        # static step has no data-dependent shape for torch.compile to guard on.
        if not self.truncate or selected_host is None:
            return self.tokens_at_block.shape[1]
        return truncated_length(self.pool_index_host[selected_host], self.tokens_at_block.shape[1])

    def gather(self, selected: torch.Tensor | None, selected_host: torch.Tensor | None = None):
        """(tokens (K', T, D), pool_index (K',)) for the selected classes (all when None)."""
        length = self.length_for(selected_host)
        if selected is None:
            return self.tokens_at_block[:, :length], self.pool_index
        return self.tokens_at_block[selected, :length], self.pool_index[selected]


def cache_on_device(nbytes: int, device_type: str, budget_bytes: float) -> bool:
    """Where an epoch's image cache of ``nbytes`` lives: on a GPU where it fits the budget, else in
    pinned host memory (on a CPU the host is the device)."""
    return device_type != "cuda" or nbytes <= budget_bytes


def keep_token_count(num_tokens: int, drop_ratio: float, prefix: int = 1) -> int:
    """Tokens kept per image: the ``prefix`` class / register tokens plus round(patches*(1-drop_ratio))
    patches (>= 1)."""
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    patches = num_tokens - prefix
    return prefix + max(1, int(round(patches * (1.0 - drop_ratio)))) if patches > 0 else prefix


class ImagePrefixCache:
    """One epoch of augmented training images, as tokens at block omega."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, device: torch.device, row_of: torch.Tensor):
        self.tokens = tokens
        self.labels = labels
        self.device = device
        self.row_of = row_of  # dataset index -> cache row (-1: not cached here, e.g. another rank's)

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()

    def epoch_batches(self, index_batches):
        """Yields (tokens, host labels, device labels) for each batch of dataset items. The
        epoch's cache rows go to the device in one copy, so a cache on the device is gathered
        there with no host round trip per step."""
        flat = torch.as_tensor([i for batch in index_batches for i in batch], dtype=torch.long)
        rows = self.row_of[flat]
        if bool((rows < 0).any()):
            raise KeyError(f"items {flat[rows < 0].tolist()} are not in this cache")
        device_rows = rows.to(self.tokens.device)
        labels = self.labels[rows]
        device_labels = labels.to(self.device)
        start = 0
        for batch in index_batches:
            end = start + len(batch)
            x = self.tokens[device_rows[start:end]]
            if x.device != self.device:  # a cache in host memory: this batch is copied in
                x = x.to(self.device, non_blocking=True)
            yield x, labels[start:end], device_labels[start:end]
            start = end

    @classmethod
    @torch.no_grad()
    def build(cls, image, loader, skip_layers: int, device: torch.device, dtype: torch.dtype,
              drop_ratio: float = 0.0, generator: torch.Generator | None = None,
              budget_bytes: int = 8 << 30, progress: bool = True, autocast_dtype=None, description="caching"):
        """Run every (augmented) image of ``loader`` through the frozen prefix.

        ``loader`` yields (images, labels, dataset indices), over the whole dataset or a subset
        of it (one rank's share). The cache lives on ``device`` when it fits ``budget_bytes``,
        else in pinned host memory and batches are copied in as needed. ``image``: the model's
        ``ImagePlan`` (``skipkernels.skip.towers``), which runs the prefix under its policy.
        """
        dataset = loader.dataset
        if isinstance(dataset, torch.utils.data.Subset):
            item_indices = torch.as_tensor(list(dataset.indices), dtype=torch.long)
            num_items = len(dataset.dataset)
        else:
            item_indices = torch.arange(len(dataset))
            num_items = len(dataset)
        row_of = torch.full((num_items,), -1, dtype=torch.long)
        row_of[item_indices] = torch.arange(len(item_indices))
        total = len(item_indices)
        store = None
        labels = torch.empty(total, dtype=torch.long)
        tower = image.tower
        if drop_ratio > 0 and tower.token_dropping_off_reason() is not None:
            raise ValueError(f"token dropping is not possible for this model: {tower.token_dropping_off_reason()}")
        for images, batch_labels, indices in tqdm(loader, desc=description, disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                x = image.blocks_between(image.stem(images), 0, skip_layers)
            if drop_ratio > 0:
                x = _drop_patch_tokens(x, drop_ratio, generator, tower.prefix_tokens)
            if store is None:
                shape = (total,) + tuple(x.shape[1:])
                nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                on_device = cache_on_device(nbytes, device.type, budget_bytes)
                store = torch.empty(shape, dtype=dtype, device=device if on_device else "cpu",
                                    pin_memory=(not on_device) and torch.cuda.is_available())
            rows = row_of[indices]
            store[rows.to(store.device)] = x.to(store.dtype).to(store.device)
            labels[rows] = batch_labels
        if store is None:
            raise ValueError("the training set is empty: nothing to cache")
        return cls(store, labels, device, row_of)


def _drop_patch_tokens(x, drop_ratio: float, generator, prefix: int = 1):
    batch, length, _ = x.shape
    keep = keep_token_count(length, drop_ratio, prefix)
    scores = torch.rand(batch, length - prefix, generator=generator).to(x.device)
    patch_idx = scores.topk(keep - prefix, dim=1).indices.sort(dim=1).values + prefix  # keep spatial order
    # class / register tokens: never dropped
    prefix_idx = torch.arange(prefix, device=x.device).expand(batch, prefix)
    idx = torch.cat([prefix_idx, patch_idx], dim=1)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class PrefixOffload:
    """Frozen weights that only the LSkip caching passes read, held off the device between them.

    ``offload()`` copies each distinct storage of ``tensors`` to host memory (pinned where
    ``pin``) and frees the device storage in place (``untyped_storage().resize_(0)``); ``restore()``
    gives the storage back its bytes and copies them in. The tensors stay the same objects with
    the same device, shape and dtype, so the modules, block plans and the optimizer holding them
    need no update; only their contents are absent while offloaded. The host copy is released on
    restore: weights changed while on the device are never shadowed by a stale copy."""

    def __init__(self, tensors, pin: bool):
        self.pin = pin
        storages = {}
        for t in tensors:
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage)
        # a storage that cannot be resized (e.g. mapped from a weights file) stays where it is
        self.storages = [s for s in storages.values() if s.nbytes() > 0 and s.resizable()]
        self.sizes = [s.nbytes() for s in self.storages]
        self.nbytes = sum(self.sizes)
        self.host = None  # the storages' bytes while offloaded

    @property
    def offloaded(self) -> bool:
        return self.host is not None

    @staticmethod
    def _bytes_of(storage) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)

    @torch.no_grad()
    def offload(self) -> None:
        if self.offloaded:
            return
        host = []
        for storage in self.storages:
            copy = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.pin)
            copy.copy_(self._bytes_of(storage))  # blocking: the bytes are on the host before the free
            host.append(copy)
        for storage in self.storages:
            storage.resize_(0)
        self.host = host

    @torch.no_grad()
    def restore(self) -> None:
        if not self.offloaded:
            return
        for storage, size, copy in zip(self.storages, self.sizes, self.host):
            storage.resize_(size)
            self._bytes_of(storage).copy_(copy)  # blocking: the host copy may be released after
        self.host = None

"""Paged KV block pool with hash-chained prefix caching.

A block holds `block_size` consecutive tokens of one sequence. Full blocks are registered under a hash
that chains the parent block's hash, a per-tenant salt and the block's token ids, so two requests share a
block only when their whole prefix up to it matches (and their salts agree). Freed blocks keep their
contents and stay findable until the allocator needs them back (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict

from thinkgate.engine.request import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_key: list[tuple | None] = [None] * num_blocks  # exact key, guards against hash collisions
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.seq_hashes: dict[str, list[int]] = {}  # request id -> hashes of its registered full blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table so it covers `num_tokens` positions."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its cached contents
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_key[block] = None
        self.ref_count[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the longest cached prefix of the sequence; return tokens reused.

        At least one token is always left to compute, since the step needs logits for the last one."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        ids = seq.all_ids
        max_blocks = (len(ids) - 1) // self.block_size
        parent, hashes = None, []
        for b in range(max_blocks):
            key = (parent, seq.cache_salt, tuple(ids[b * self.block_size:(b + 1) * self.block_size]))
            h = hash(key)
            block = self.hash_to_block.get(h)
            if block is None or self.block_key[block] != key:
                break
            if self.ref_count[block] == 0:
                self.free.pop(block)
            self.ref_count[block] += 1
            seq.block_table.append(block)
            hashes.append(h)
            parent = h
        self.seq_hashes[seq.request_id] = hashes
        seq.num_computed = len(hashes) * self.block_size
        return seq.num_computed

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the sequence's newly completed blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_hashes.setdefault(seq.request_id, [])
        n_full = seq.num_computed // self.block_size
        ids = seq.all_ids
        while len(hashes) < n_full:
            b = len(hashes)
            parent = hashes[-1] if hashes else None
            key = (parent, seq.cache_salt, tuple(ids[b * self.block_size:(b + 1) * self.block_size]))
            h = hash(key)
            block = seq.block_table[b]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self.block_key[block] = key
            hashes.append(h)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's hold on its blocks; cached ones stay reusable until evicted."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing worth keeping: reuse it first
        seq.block_table = []
        self.seq_hashes.pop(seq.request_id, None)

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past those covering `num_tokens` positions (rejected speculative tokens';
        never registered, since only computed full blocks are)."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)

    def check_integrity(self, live: list[Sequence] | None = None) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent."""
        for b in range(self.num_blocks):
            assert self.ref_count[b] >= 0, f"block {b} has negative refs"
            assert (self.ref_count[b] == 0) == (b in self.free), f"block {b}: refs {self.ref_count[b]} vs free list"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h, f"hash map points at block {b} holding another hash"
        if live is not None:
            refs = [0] * self.num_blocks
            for s in live:
                for b in s.block_table:
                    refs[b] += 1
            assert refs == self.ref_count, "ref counts differ from the live sequences' block tables"

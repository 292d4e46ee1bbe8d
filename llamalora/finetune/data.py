"""Training samples and batches as llama.cpp's finetune made them (common/train.cpp).

Samples: without --sample-start, one sample starts at every token position of the tokenized text (each
n_ctx tokens long); with it, the text is cut at every occurrence of the pattern and each piece is tokenized
on its own (the pattern itself kept with --include-sample-start).

Order: the samples are shuffled with std::mt19937 (numpy's MT19937 seeded the same way gives the same
numbers), each with a random start offset; after an epoch the next shuffle continues from the generator's
state. A checkpoint keeps the generator states and the position, so a resumed run sees the same batches.

Batches: row k starts with BOS, the targets are the sample's tokens and the inputs the targets shifted right
by one. A sample shorter than the context is padded with EOS, or with --fill-with-next-samples continued by
the next samples, separated by EOS and then BOS unless --no-separate-with-eos / --no-separate-with-bos.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass
class Samples:
    tokens: np.ndarray  # int64[n_tokens]: all samples' tokens back to back
    begins: np.ndarray  # int64[n_samples]
    sizes: np.ndarray   # int64[n_samples]


def make_samples(text: str, tokenize, n_ctx: int, sample_start: str = "", include_sample_start: bool = False,
                 source: str = "<train-data>") -> Samples:
    """tokenize: str -> list of token ids (no BOS added)."""
    if not sample_start:
        tokens = np.asarray(tokenize(text), dtype=np.int64)
        if len(tokens) == 0:
            raise InputError(f"{source}: the training data holds no tokens")
        end = len(tokens) - n_ctx if len(tokens) >= n_ctx else 0
        begins = np.concatenate([[0], np.arange(1, max(end, 1), dtype=np.int64)])
        sizes = np.full(len(begins), n_ctx, dtype=np.int64)
        sizes[0] = min(n_ctx, len(tokens))
        return Samples(tokens, begins.astype(np.int64), sizes)
    starts = []
    at = text.find(sample_start)
    while at >= 0:
        starts.append(at)
        at = text.find(sample_start, at + len(sample_start))
    skip = 0 if include_sample_start else len(sample_start)
    pieces = []
    if not starts:
        pieces.append(text)  # llama.cpp: "sample start pattern not found, inserting single sample at data begin"
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(text)
        pieces.append(text[start + skip: stop])
    all_tokens, begins, sizes = [], [], []
    n = 0
    for piece in pieces:
        if not piece:
            continue
        ids = tokenize(piece)
        if not ids:
            continue
        begins.append(n)
        sizes.append(len(ids))
        all_tokens.extend(ids)
        n += len(ids)
    if not begins:
        raise InputError(f"{source}: no non-empty sample between the occurrences of --sample-start {sample_start!r}")
    return Samples(np.asarray(all_tokens, dtype=np.int64), np.asarray(begins, dtype=np.int64),
                   np.asarray(sizes, dtype=np.int64))


# ---- std::mt19937, as numpy's MT19937 with the legacy (init_genrand) seeding ----

def seed_state(seed: int) -> dict:
    generator = np.random.MT19937()
    generator._legacy_seeding(int(seed) & 0xFFFFFFFF)
    return generator.state


def shuffle_samples(state: dict, samples: Samples) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(offsets, begins, sizes) in shuffled order and the generator state after, as llama.cpp's shuffle_samples."""
    generator = np.random.MT19937()
    generator.state = state
    count = len(samples.begins)
    rnd = generator.random_raw(count).astype(np.uint64)
    order = np.argsort(rnd, kind="stable")  # ties by index, as llama.cpp's sort
    draws = generator.random_raw(count).astype(np.float64)
    sizes = samples.sizes[order]
    offsets = ((sizes - 1) * (draws / float(0xFFFFFFFF - 1))).astype(np.int64)
    return offsets, samples.begins[order], sizes, generator.state


@dataclass
class DataOrder:
    """Where the run is in the shuffled samples: what a checkpoint must keep for the same batches to follow."""
    state_current: dict   # the generator state this epoch's shuffle was drawn from
    state_next: dict      # the state after it (the next epoch's shuffle starts there)
    next_sample: int = 0  # position in this epoch's shuffled order
    epochs: int = 0       # completed epochs
    samples_used: int = 0


def start_order(seed: int, samples: Samples) -> DataOrder:
    state = seed_state(seed)
    *_, after = shuffle_samples(state, samples)
    return DataOrder(state, after)


@dataclass
class BatchOptions:
    bos: int
    eos: int
    n_vocab: int
    separate_with_eos: bool = True
    separate_with_bos: bool = True
    fill_with_next_samples: bool = False
    sample_random_offsets: bool = False


def next_batch(samples: Samples, order: DataOrder, n_batch: int, n_ctx: int, options: BatchOptions,
               shuffled=None):
    """tokens, targets int64[n_batch, n_ctx] of the next batch; advances `order` (reshuffling after an epoch).

    shuffled: the current epoch's shuffle_samples result, passed back in to spare recomputing it."""
    if shuffled is None:
        shuffled = shuffle_samples(order.state_current, samples)
    offsets, begins, sizes, _ = shuffled
    tokens, targets, used = batch_from(samples.tokens, offsets, begins, sizes, order.next_sample, n_batch, n_ctx,
                                       options)
    order.samples_used += used
    order.next_sample += used
    if order.next_sample >= len(begins):
        order.epochs += 1
        order.state_current = order.state_next
        shuffled = shuffle_samples(order.state_current, samples)
        order.state_next = shuffled[3]
        order.next_sample = 0
    return tokens, targets, shuffled


def batch_from(data, offsets, begins, sizes, example_id, n_batch, n_ctx, o: BatchOptions):
    """llama.cpp's get_example_targets_batch: inputs, targets and the number of samples consumed."""
    count = len(begins)
    tokens = np.empty((n_batch, n_ctx), dtype=np.int64)
    targets = np.empty((n_batch, n_ctx), dtype=np.int64)
    used = 0
    for k in range(n_batch):
        index = (example_id + used) % count
        offset = int(offsets[index]) if o.sample_random_offsets else 0
        begin, size = int(begins[index]), int(sizes[index])
        used += 1
        tokens[k, 0] = o.bos
        separated_eos = not o.separate_with_eos
        separated_bos = not o.separate_with_bos
        for i in range(n_ctx):
            token = o.eos
            if offset >= size and o.fill_with_next_samples:
                if not separated_eos:
                    separated_eos = True
                elif not separated_bos:
                    separated_bos = True
                    token = o.bos
                else:
                    separated_eos = not o.separate_with_eos
                    separated_bos = not o.separate_with_bos
                    offset = 0
                    index = (example_id + used) % count
                    begin, size = int(begins[index]), int(sizes[index])
                    used += 1
            if offset < size:
                token = min(max(int(data[begin + offset]), 0), o.n_vocab - 1)
                offset += 1
            targets[k, i] = token
            if i + 1 < n_ctx:
                tokens[k, i + 1] = token
    return tokens, targets, used

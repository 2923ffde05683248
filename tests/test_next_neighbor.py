"""NAR next-neighbour prediction (mmgen.paradigms.next_neighbor) against slow references written here: the decoding
order, the diagonal mask and the head mixing, greedy generation against a full recompute one anti-diagonal at a
time (wrong variants of the reference must fail: a raster mask, swapped heads, the first token from one head),
exact pass counts, a falling loss, save / reload, the CLI, refusals, and the watermark keyed by decoded
neighbours. Tiny models: width 32, 2 layers, 4x4 (or 3x4) grids."""

import json
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from tiny import BACKBONE, tiny_code_paradigm, tiny_text_tokenizer, tiny_vqgan
from mmgen import cli
from mmgen.paradigms import next_neighbor as nar
from mmgen.paradigms.protocol import ModelConfig
from mmgen.paradigms.sequence import text_block
from mmgen.pipelines import NextTokenPipeline, load_pipeline, paradigm_name, save_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.sampling.config import SamplingConfig
from mmgen.text import UnifiedVocab
from mmgen.watermark import KeyOrder, WatermarkConfig, WatermarkProcessor, detect_tokens, kmeans
from mmgen.watermark.core import KeyedPermutations, uniform_sum_sf

torch.set_num_threads(1)
TEXT_IDS = [[3, 4], [5]]
VARIANTS = ["right", "raster_mask", "swapped_heads", "first_from_right"]  # "right" is the paradigm; the rest are wrong


tiny_parts = partial(tiny_code_paradigm, nar)  # layout and a 2-layer NARTransformer


# ---- the slow reference -------------------------------------------------------------------------------------


def reference_mask(layout, valid_BL, variant="right"):
    """Pair by pair: text causal over valid keys; image (r, c) sees the text and every (r', c') with r' + c' <= r + c
    (the wrong variant "raster_mask": every earlier raster position); every query sees itself."""
    T0, (h, w) = layout.max_text_len + 1, layout.grid
    L = valid_BL.shape[1]

    def sees(q, k):
        if k < T0 or variant == "raster_mask":
            return k <= q
        (rq, cq), (rk, ck) = divmod(q - T0, w), divmod(k - T0, w)
        return q >= T0 and rk + ck <= rq + cq

    rule = torch.tensor([[sees(q, k) for k in range(L)] for q in range(L)])
    return ((rule[None] & valid_BL[:, None, :]) | torch.eye(L, dtype=torch.bool)).unsqueeze(1)


def reference_positions(layout):
    T0, (h, w) = layout.max_text_len + 1, layout.grid
    pos = [(i, i) for i in range(T0)] + [(T0 + t // w, T0 + t % w) for t in range(h * w - 1)]
    return torch.tensor(pos)[None]


def reference_logits(right, bottom, layout, variant="right"):
    """(B, N, V): token (i, j) from the right head at (i, j-1) and the bottom head at (i-1, j), mean of both inside,
    one head on the first row / column, the mean of both at <boi> for the first token."""
    T0, (h, w) = layout.max_text_len + 1, layout.grid
    if variant == "swapped_heads":
        right, bottom = bottom, right
    at = lambda r, c: T0 + r * w + c  # noqa: E731 (the slot of image token (r, c))
    out = []
    for i in range(h):
        for j in range(w):
            if i == j == 0:
                boi = T0 - 1
                out.append(right[:, boi] if variant == "first_from_right" else (right[:, boi] + bottom[:, boi]) / 2)
            elif i == 0:
                out.append(right[:, at(0, j - 1)])
            elif j == 0:
                out.append(bottom[:, at(i - 1, 0)])
            else:
                out.append((right[:, at(i, j - 1)] + bottom[:, at(i - 1, j)]) / 2)
    return torch.stack(out, 1)


def reference_forward(model, layout, text_ids, codes_BN, variant="right"):
    """Both heads over the whole teacher-forced sequence, no cache, mixed by the reference rule."""
    text, valid = text_block(layout, text_ids)
    seq = torch.cat([text, layout.vocab.image_to_unified(codes_BN[:, :-1])], 1)
    valid = torch.cat([valid, torch.ones(len(seq), seq.shape[1] - text.shape[1], dtype=torch.bool)], 1)
    with torch.no_grad():
        right, bottom = model(seq, positions=reference_positions(layout), mask=reference_mask(layout, valid, variant))
    return reference_logits(right, bottom, layout, variant)


def reference_generate(model, layout, text_ids, scale, schedule="constant", variant="right"):
    """Greedy decoding by full recompute, one anti-diagonal r + c = d at a time (undecoded tokens hold 0)."""
    h, w = layout.grid
    B, D = len(text_ids), h + w - 1
    codes = torch.zeros(B, h * w, dtype=torch.long)
    rows = list(text_ids) + ([[]] * B if scale != 1 else [])
    for d in range(D):
        logits = reference_forward(model, layout, rows, torch.cat([codes] * (len(rows) // B)), variant)
        if scale != 1:
            weight = scale if schedule == "constant" else 1 + (scale - 1) * d / (D - 1)
            cond, uncond = logits.chunk(2)
            logits = uncond + weight * (cond - uncond)
        for t in range(h * w):
            if t // w + t % w == d:
                codes[:, t] = logits[:, t].argmax(-1)
    return codes.view(B, h, w)


# ---- order, mask, heads -----------------------------------------------------------------------------------------


def test_order_is_by_manhattan_distance_from_the_top_left_token():
    layout, _ = tiny_parts(grid=(3, 4))
    diagonals = [d.tolist() for d in layout.diagonals()]
    assert len(diagonals) == layout.num_steps == 3 + 4 - 1
    assert diagonals == [[0], [1, 4], [2, 5, 8], [3, 6, 9], [7, 10], [11]]  # raster ids, row by row
    assert sorted(range(12), key=lambda t: (t // 4 + t % 4, t // 4)) == sum(diagonals, [])
    for grid, passes in {(8, 8): 15, (16, 16): 31}.items():  # the paradigm's headline counts
        assert nar.NARLayout(UnifiedVocab(4, 4), 2, grid).num_steps == passes


@pytest.mark.parametrize("variant", VARIANTS)
def test_diagonal_mask_and_head_mixing_match_the_reference(variant):
    """The paradigm's teacher-forced mixed logits (the loss's) equal the slow reference's; each wrong variant of the
    reference differs, so the comparison has the power to catch a wrong mask or head."""
    layout, model = tiny_parts(grid=(3, 4))
    codes = torch.randint(16, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = nar.build_batch(layout, TEXT_IDS, codes.view(2, 3, 4))
    if variant == "right":
        assert torch.equal(batch.mask, reference_mask(layout, batch.tokens != layout.vocab.pad))
    with torch.no_grad():
        right, bottom = model(batch.tokens, positions=batch.positions, mask=batch.mask)
        T0 = layout.max_text_len + 1
        ours = nar.mix_heads(right[:, T0 - 1:], bottom[:, T0 - 1:], *layout.head_sources())
        loss = nar.loss_fn(model, batch, layout)
    ref = reference_forward(model, layout, TEXT_IDS, codes, variant)
    same = torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert same == (variant == "right"), (ours - ref).abs().max()
    if variant == "right":
        ce = torch.nn.functional.cross_entropy(ref.flatten(0, 1), codes.flatten())
        assert loss.item() == pytest.approx(ce.item(), abs=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_full_recompute_one_diagonal_at_a_time(variant):
    """Cached decoding (one anti-diagonal per pass, slots in decoding order) against the reference without a cache,
    under guidance, constant and ramped; the wrong variants of the reference give other tokens."""
    layout, model = tiny_parts(wild=True)
    for schedule in ("constant", "linear"):
        sampling = SamplingConfig(guidance_scale=2.0, temperature=0, cfg_schedule=schedule)
        codes, cost = nar.generate(model, layout, TEXT_IDS, sampling)
        ref = reference_generate(model, layout, TEXT_IDS, 2.0, schedule, variant)
        assert torch.equal(codes, ref) == (variant == "right"), (schedule, codes, ref)
        assert cost.decoder_passes == 7
        if variant != "right":
            break


# ---- passes, sampling, training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (3, 4)])
def test_decoder_passes_are_counted_exactly(grid):
    """h + w - 1 passes: the prompt pass (text block, gives the first token), then one per anti-diagonal but the
    last; the pass count is what the model actually ran."""
    layout, model = tiny_parts(grid=grid)
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[1]))
    _, cost = nar.generate(model, layout, TEXT_IDS, SamplingConfig(guidance_scale=1.5),
                           generators_from_seed(0, 2))
    hook.remove()
    h, w = grid
    assert cost.decoder_passes == len(fed) == h + w - 1
    assert fed == [layout.max_text_len + 1] + [len(d) for d in layout.diagonals()[:-1]]


def test_each_image_draws_from_its_own_generator():
    layout, model = tiny_parts(wild=True)
    sampling = SamplingConfig(guidance_scale=2.0)
    both, _ = nar.generate(model, layout, TEXT_IDS, sampling, generators_from_seed(7, 2))
    alone, _ = nar.generate(model, layout, TEXT_IDS[1:], sampling, generators_from_seed(8, 1))
    assert torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])


def test_training_loss_falls():
    layout, model = tiny_parts()
    model.train()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(16, (8, 4, 4), generator=g)  # 8 images to memorise, each with its own caption
    text_ids = [[1 + i] for i in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nar.loss_fn(model, nar.build_batch(layout, text_ids, codes), layout)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(16), abs=0.1)  # a fresh model is near uniform
    assert losses[-1] < 0.4 * losses[0], losses


# ---- pipeline, CLI, refusals ------------------------------------------------------------------------------------


def tiny_nar_pipeline(tok, seed=0) -> NextTokenPipeline:
    """16 px, 4x4 codes of 32 (tiny_vqgan), text up to 8 tokens, a 2-layer NARTransformer."""
    vq = tiny_vqgan(channel_mult=(1, 2, 2), seed=seed)
    vocab = UnifiedVocab(len(tok), vq.vocab_size)
    tr = nar.NARTransformer(vocab.size, vq.vocab_size, max_seq_len=8 + 1 + 15, **BACKBONE)
    return NextTokenPipeline(transformer=tr.eval(), vq_model=vq.eval(), tokenizer=tok, max_text_len=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = tiny_nar_pipeline(tiny_text_tokenizer())
    return pipe, save_pipeline(pipe, tmp_path_factory.mktemp("nar") / "model")


def test_pipeline_saves_and_reloads_bit_identical(saved):
    pipe, directory = saved
    again = load_pipeline(directory)
    assert paradigm_name(again) == "next_neighbor" and again.layout == pipe.layout
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(),
                                                 again.transformer.state_dict().values()))
    outs = []
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
        outs.append(p(prompt=["a red circle", "two green stars"], guidance_scale=2.0,
                      generator=generators_from_seed(3, 2)))
    a, b = outs
    assert a.decoder_passes == b.decoder_passes == 7 and a.step_compression == pytest.approx(16 / 7)
    assert torch.equal(a.tokens, b.tokens) and all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))
    assert not torch.equal(a.tokens[0], a.tokens[1])


def test_cli_generates_from_the_saved_directory(saved, tmp_path, capsys):
    _, directory = saved
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a red circle", "--model", str(directory), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pipeline"] == "NextTokenPipeline" and result["nfe_per_image"] == 7 and out.is_file()


def test_bad_input_is_refused_by_name(saved, tmp_path, capsys):
    pipe, directory = saved
    one_d = SimpleNamespace(kind="codes", token_shape=(1, 8), vocab_size=16)  # SEED's causal 1-D codes
    with pytest.raises(ValueError, match=r"next_neighbor needs a 2-D token grid with h >= 2 and w >= 2 .*got \(1, 8\)"
                                         r".*use paradigm next_token"):
        nar.make_layout(one_d, UnifiedVocab(4, 16), 2, ModelConfig(**BACKBONE))
    latents = SimpleNamespace(kind="latents", token_shape=(4, 4, 4), vocab_size=0)
    with pytest.raises(ValueError, match=r"next_neighbor needs a tokenizer of kind 'codes' .*got kind 'latents'"):
        nar.make_layout(latents, UnifiedVocab(4, 0), 2, ModelConfig(**BACKBONE))
    with pytest.raises(ValueError, match=r"sampler must be 'ar' for this model; got 'sjd': NAR \(next_neighbor\)"):
        pipe(prompt="a red circle", sampler="sjd")
    with pytest.raises(ValueError, match=r"compile_decode .*a NARTransformer decoder"):
        pipe(prompt="a red circle", compile_decode=True)
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "a red circle", "--model", str(directory), "--out", str(tmp_path / "o.png"),
                  "--sampler", "sjd"])
    assert exc.value.code == 2 and "sampler must be 'ar'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---- watermark ------------------------------------------------------------------------------------------------


def test_keyed_by_in_raster_order_is_the_prefix_processor():
    """`WatermarkProcessor.keyed_by` with `KeyOrder.raster` reweights exactly as the processor does along a raster
    prefix (contexts, skipped repeats), so the two paths cannot drift apart."""
    cfg = WatermarkConfig(num_clusters=4, context=2, clusters=[i % 4 for i in range(16)])
    proc = WatermarkProcessor(cfg, "k")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(3, (6, 16), generator=g)  # few symbols: repeated contexts
    positions = torch.arange(6) * 3  # row b asks for position 3b
    logits = torch.randn(6, 16, generator=g)
    raster = proc.keyed_by(KeyOrder.raster(16), logits, codes, torch.arange(6), positions)
    assert torch.equal(raster, proc(logits, codes, positions))
    assert not torch.equal(raster, logits.float())


def markov_grids(n, side=8, vocab=64, seed=0):
    """Low-entropy token grids (runs along rows): many repeated contexts."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.zeros(n, side * side, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, side * side):
        stay = torch.rand(n, generator=g) < 0.7
        seqs[:, t] = torch.where(stay, seqs[:, t - 1], torch.randint(vocab, (n,), generator=g))
    return seqs


def test_watermark_keyed_by_decoded_neighbours_is_detected_and_calibrated():
    """Generation keys token (r, c) by its left neighbour's chain (the one above in the first column), all decoded
    on earlier anti-diagonals; detection with the same order flags watermarked grids and keeps its false-positive
    rate at or below the nominal one on unwatermarked grids (low entropy: many repeated contexts, skipped)."""
    layout = nar.NARLayout(UnifiedVocab(10, 64), 4, (8, 8))
    torch.manual_seed(0)
    model = nar.make_model(layout, ModelConfig(**BACKBONE)).eval()  # near-uniform: high entropy
    order = nar.watermark_key_order(layout)
    assert order.parents[:10] == (-1, 0, 1, 2, 3, 4, 5, 6, 0, 8) and order.order[:6] == (0, 1, 8, 2, 9, 16)
    clusters = kmeans(model.bottom_head.proj.weight.detach(), 8).tolist()
    cfg = WatermarkConfig(num_clusters=8, context=2, clusters=clusters)
    codes, _ = nar.generate(model, layout, [[3, 4]] * 24, SamplingConfig(), generators_from_seed(0, 24),
                            processor=WatermarkProcessor(cfg, "k1"))
    hits = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k1", order)]
    wrong_key = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k2", order)]
    assert sum(hits) >= 20 and sum(wrong_key) <= 1, (sum(hits), sum(wrong_key))
    small = nar.watermark_key_order(nar.NARLayout(UnifiedVocab(10, 64), 4, (6, 6)))
    grids = markov_grids(300, side=6)  # unwatermarked; each under its own key, so every p-value is exact under H0
    p_values = torch.tensor([detect_tokens(grids[i: i + 1], cfg, f"key-{i}", small)[0].p_value for i in range(300)])
    for nominal in (0.01, 0.05, 0.2):
        assert (p_values < nominal).float().mean() <= nominal, nominal
    assert (p_values < 0.5).float().mean() > 0.3
    # power of the check: scoring every position, repeated contexts included, breaks the null distribution
    naive = []
    for i, row in enumerate(cfg.symbols(grids[:100]).tolist()):
        perms = KeyedPermutations(f"key-{i}", 8)
        ranks = [int(perms.ranks(small.context(row, t, 2))[row[t]]) for t in small.order]
        naive.append(uniform_sum_sf(sum(ranks), len(ranks), 8))
    assert (torch.tensor(naive) < 0.01).float().mean() > 0.02

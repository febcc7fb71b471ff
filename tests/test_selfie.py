import pytest
import torch
import torch.nn.functional as F

from model.attention_pool import PoolShape
from model.selfie import LogitScale, PositionEmbedding, build_selfie, patch_selection_loss
from pipeline.patches import patchify_and_mask, sample_context_permutation
from train.methods import Parts, parts_of


def naive_loss(u, pos_masked, h_masked):
    """Per image, per masked slot j: logits v_j . h_k over the same image's masked patches, target j."""
    losses, hits = [], []
    for b in range(u.shape[0]):
        for j in range(h_masked.shape[1]):
            v = u[b] + pos_masked[b, j]
            logits = torch.stack([v @ h_masked[b, k] for k in range(h_masked.shape[1])])
            losses.append(F.cross_entropy(logits[None], torch.tensor([j])))
            hits.append(float(logits.argmax() == j))
    return torch.stack(losses).mean(), sum(hits) / len(hits)


@pytest.mark.parametrize("batch,masked,dim", [(1, 4, 8), (5, 4, 16), (3, 12, 32)])
def test_batched_loss_equals_naive_reference(batch: int, masked: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    u = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    pos = torch.randn(batch, masked, dim, generator=generator, dtype=torch.float64)
    h = torch.randn(batch, masked, dim, generator=generator, dtype=torch.float64)
    out = patch_selection_loss(u[:, None] + pos, h)
    loss, accuracy = naive_loss(u, pos, h)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-5)
    assert out.accuracy.item() == pytest.approx(accuracy)
    assert out.logits.shape == (batch, masked, masked)


def test_model_loss_matches_naive_pipeline() -> None:
    torch.manual_seed(0)
    model = build_selfie(width=0.125, grid=4, pool=PoolShape(layers=1, intermediate=16, heads=4)).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    perm = sample_context_permutation(3, 16, torch.Generator().manual_seed(1))
    patches = patchify_and_mask(images, perm, 8, 12)
    out = model(patches, perm[:, :12], perm[:, 12:])
    # Per sample: embed its own patches, pool its context, score its masked slots.
    with torch.no_grad():
        h = model.forward_features(patches)
    context, masked = h[:36].view(3, 12, -1), h[36:].view(3, 4, -1)
    u = model.pool(context + model.position(perm[:, :12]))
    loss, accuracy = naive_loss(u.double(), model.position(perm[:, 12:]).double(), masked.double())
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-4, atol=1e-4)
    assert out.accuracy.item() == pytest.approx(accuracy)


def test_position_embedding_counts() -> None:
    small = PositionEmbedding(grid=4, dim=8)
    large = PositionEmbedding(grid=7, dim=8)
    assert small.kind == "full" and sum(p.shape[0] for p in small.parameters()) == 16
    assert large.kind == "rowcol" and sum(p.shape[0] for p in large.parameters()) == 14
    positions = torch.tensor([0, 8, 48])  # (0,0), (1,1), (6,6)
    torch.testing.assert_close(large(positions)[1], large.rows[1] + large.cols[1])
    torch.testing.assert_close(large(positions)[2], large.rows[6] + large.cols[6])
    with pytest.raises(ValueError, match="position embedding kind"):
        PositionEmbedding(grid=4, dim=8, kind="sinusoid")


def test_position_on_context_switch_changes_the_encoder_input() -> None:
    torch.manual_seed(0)
    on = build_selfie(width=0.125, grid=4, pool=PoolShape(layers=1, intermediate=16, heads=4)).eval()
    off = build_selfie(
        width=0.125, grid=4, pool=PoolShape(layers=1, intermediate=16, heads=4), position_on_context=False
    ).eval()
    off.load_state_dict(on.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    perm = sample_context_permutation(2, 16)
    patches = patchify_and_mask(images, perm, 8, 12)
    with torch.no_grad():
        assert not torch.allclose(
            on(patches, perm[:, :12], perm[:, 12:]).logits, off(patches, perm[:, :12], perm[:, 12:]).logits
        )


@pytest.mark.parametrize("stem,size,patch", [("small", 32, 8), ("imagenet", 224, 32)])
def test_shapes_for_both_paper_grids(stem: str, size: int, patch: int) -> None:
    grid = size // patch
    model = build_selfie(width=0.125, stem=stem, grid=grid, pool=PoolShape(layers=1, intermediate=16, heads=4))
    perm = sample_context_permutation(2, grid * grid)
    num_context = round(0.75 * grid * grid)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    out = model(patchify_and_mask(images, perm, patch, num_context), perm[:, :num_context], perm[:, num_context:])
    masked = grid * grid - num_context
    assert out.logits.shape == (2, masked, masked) and out.loss.ndim == 0


def test_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = build_selfie(width=0.125, grid=4, pool=PoolShape(layers=1, intermediate=32, heads=4, dropout=0.0))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    perm = sample_context_permutation(4, 16, torch.Generator().manual_seed(0))
    patches = patchify_and_mask(images, perm, 8, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = model(patches, perm[:, :12], perm[:, 12:])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.05 < first
    assert out.accuracy.item() == 1.0


def small_selfie(query: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_selfie(width=0.125, grid=4, pool=PoolShape(layers=2, intermediate=16, heads=4), query=query).eval()


def masked_batch(batch: int = 3, context: int = 12):
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    perm = sample_context_permutation(batch, 16, torch.Generator().manual_seed(1))
    return patchify_and_mask(images, perm, 8, context), perm[:, :context], perm[:, context:]


def test_the_default_query_is_the_papers_formula() -> None:
    """Switched off (the default), the query is v_j = u + pos_j exactly, and the loss is the paper's."""
    model = small_selfie("paper")
    assert build_selfie(width=0.125, grid=4, pool=PoolShape(heads=4)).query_kind == "paper"
    patches, context_pos, masked_pos = masked_batch()
    with torch.no_grad():
        features = model.forward_features(patches)
        u, masked = model.encode_context(features, context_pos)
        context = features[:36].view(3, 12, -1) + model.position(context_pos)
        torch.testing.assert_close(u, model.pool(context))
        torch.testing.assert_close(model.queries(u, masked_pos), u[:, None] + model.position(masked_pos))
        out = model(patches, context_pos, masked_pos)
    expected = patch_selection_loss(u[:, None] + model.position(masked_pos), masked)
    assert torch.equal(out.loss, expected.loss) and torch.equal(out.logits, expected.logits)


def test_the_attending_query_shapes_and_each_slot_reads_only_the_context() -> None:
    model = small_selfie("attend")
    patches, context_pos, masked_pos = masked_batch(batch=3, context=10)
    with torch.no_grad():
        context, masked = model.encode_context(model.forward_features(patches), context_pos)
        queries = model.queries(context, masked_pos)
        out = model(patches, context_pos, masked_pos)
        alone = model.queries(context, masked_pos[:, 2:3])  # one slot asked on its own
        other_context = model.queries(context.roll(1, dims=0), masked_pos)
    dim = model.patch_net.num_features
    assert context.shape == (3, 10, dim) and masked.shape == (3, 6, dim) and queries.shape == (3, 6, dim)
    assert out.logits.shape == (3, 6, 6) and torch.isfinite(out.loss)
    torch.testing.assert_close(alone[:, 0], queries[:, 2], rtol=1e-5, atol=1e-5)  # slots do not see each other
    assert not torch.allclose(other_context, queries, atol=1e-3)  # the context changes every slot's query
    seeds = model.pool.u0 + model.position(masked_pos)
    with torch.no_grad():  # slot j alone, by the blocks run on [u0 + pos_j, context] one slot at a time
        for j in range(6):
            torch.testing.assert_close(model.pool.query(context, seeds[:, j : j + 1])[:, 0], queries[:, j])
    assert {name for name, _ in model.named_parameters()} == {n for n, _ in small_selfie("paper").named_parameters()}


def test_selfie_names_p_and_a_as_every_pretext_model_does() -> None:
    """`backbone` (P) and `pool` (A) are the fixed names; the state dict keeps P under patch_net."""
    model = build_selfie(width=0.125, grid=4, pool=PoolShape(layers=1, intermediate=16, heads=4))
    assert model.backbone is model.patch_net
    assert parts_of(model) == Parts("patch_net.", "pool.")
    assert any(name.startswith("patch_net.") for name in model.state_dict())


def selfie_scaled(logit_scale: str, warmup: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)  # every scale gets the same weights (the warm-up's counter draws nothing)
    pool = PoolShape(layers=2, intermediate=16, heads=4, dropout=0.0)
    return build_selfie(width=0.125, grid=4, pool=pool, logit_scale=LogitScale(logit_scale, warmup)).train()


def test_the_logit_warmup_starts_at_sqrt_d_and_ends_at_the_papers_plain_logits() -> None:
    warm, plain, sqrt_d = selfie_scaled("warmup", 3), selfie_scaled("plain"), selfie_scaled("sqrt_d")
    batch = masked_batch()
    first = warm(*batch).logits
    torch.testing.assert_close(first, sqrt_d(*batch).logits)
    warm.eval()
    for _ in range(2):  # the monitors' forwards (eval mode) leave the warm-up where it is
        warm(*batch)
    warm.train()
    second = warm(*batch).logits  # one of three forwards seen: a third of the way from 1/sqrt(D) to 1
    start = plain.patch_net.num_features**-0.5
    torch.testing.assert_close(second, plain(*batch).logits * (start + (1 - start) / 3))
    warm(*batch)
    for _ in range(2):  # three forwards seen and after: the paper's plain logits, kept
        torch.testing.assert_close(warm(*batch).logits, plain(*batch).logits)
    resumed = selfie_scaled("warmup", 3)
    resumed.load_state_dict(warm.state_dict())  # the counter is in the checkpoint
    assert resumed.logit_warmup_seen.item() == 5
    with pytest.raises(ValueError, match="positive number of forwards"):
        selfie_scaled("warmup", 0)

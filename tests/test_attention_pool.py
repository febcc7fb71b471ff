import torch

from model.attention_pool import AttentionPooling, TransformerBlock


def test_pooling_shape_and_u0_output() -> None:
    pool = AttentionPooling(hidden=64, layers=2, intermediate=40, heads=8).eval()
    tokens = torch.randn(3, 5, 64)
    u = pool(tokens)
    assert u.shape == (3, 64)
    # u is u0's output: the first position of the blocks' output over [u0, tokens].
    full = pool.blocks(torch.cat([pool.u0.expand(3, -1, -1), tokens], dim=1))
    torch.testing.assert_close(u, full[:, 0])


def test_queries_attend_to_themselves_and_the_context_and_the_context_only_to_itself() -> None:
    """`query` equals, block by block, the context run alone and each query run with the context."""
    torch.manual_seed(0)
    pool = AttentionPooling(hidden=32, layers=2, intermediate=16, heads=4).eval()
    tokens, queries = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        got = pool.query(tokens, queries)
        expected = []
        for j in range(3):
            query, context = queries[:, j : j + 1], tokens
            for block in pool.blocks:
                query = block(torch.cat([query, context], dim=1))[:, :1]
                context = block(context)
            expected.append(query[:, 0])
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, torch.stack(expected, dim=1), rtol=1e-5, atol=1e-5)


def test_pooling_is_permutation_invariant_over_tokens() -> None:
    pool = AttentionPooling(hidden=32, layers=2, intermediate=16, heads=4).eval()
    tokens = torch.randn(2, 6, 32)
    torch.testing.assert_close(pool(tokens), pool(tokens[:, torch.randperm(6)]), atol=1e-5, rtol=1e-5)


def test_block_is_post_layer_norm_bert_layer() -> None:
    block = TransformerBlock(hidden=16, intermediate=8, heads=2, dropout=0.0).eval()
    x = torch.randn(2, 3, 16)
    attended = block.norm1(x + block.attn(x))
    expected = block.norm2(attended + block.fc2(torch.nn.functional.gelu(block.fc1(attended))))
    torch.testing.assert_close(block(x), expected)


def test_paper_default_sizes() -> None:
    pool = AttentionPooling(hidden=1024)
    assert len(pool.blocks) == 3
    assert pool.blocks[0].fc1.out_features == 640
    assert pool.blocks[0].attn.heads == 32


def test_dropout_acts_only_in_training() -> None:
    pool = AttentionPooling(hidden=32, layers=1, intermediate=16, heads=4, dropout=0.5)
    tokens = torch.randn(2, 4, 32)
    pool.train()
    assert not torch.equal(pool(tokens), pool(tokens))
    pool.eval()
    assert torch.equal(pool(tokens), pool(tokens))

"""The CTR models (trainer.models) built from a spec."""
import pytest
import torch

from schemas.spec import parse_spec
from trainer.models import CTRModel


@pytest.mark.parametrize("kind", ["deepfm", "wide_deep", "dcn", "dcnv2", "dnn"])
def test_models_from_spec_learn_a_simple_rule(kind):
    """Each model fits a click rule on one slot's embedding (a smoke test that gradients flow)."""
    spec = parse_spec({"name": "m", "events": {"impression": "movielens_impression", "action": "action"},
                       "defaults": {"dim": 4},
                       "slots": [{"name": "user", "source": "user_id"}, {"name": "item", "source": "item_id"}],
                       "dense": [{"name": "age", "source": "age"}], "labels": {"actions": ["like"]},
                       "model": {"kind": kind, "hidden_units": [16, 8], "cross_layers": 2}})
    torch.manual_seed(0)
    model = CTRModel.from_spec(spec)
    emb = torch.randn(256, 2, 4)
    wide, dense = torch.zeros(256), torch.randn(256, 1)
    labels = (emb[:, 0, 0] > 0).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(emb, wide, dense), labels)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    assert model(emb, wide, dense).shape == (256,)

"""The configured loader (train/engine/loading.py): options refused at parse time, and the request each
backend is asked for."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from pipeline.loaders import LOADERS
from train.config import ConfigError, PretrainConfig, load_config
from train.config.checks import check_loader_options
from train.engine.loading import train_batches
from train.methods import stage_class

PRETRAIN = stage_class(PretrainConfig)  # the config class the entry scripts parse into


def test_a_pad_mode_the_loader_lacks_is_refused_at_parse_time_with_the_loaders_that_have_it() -> None:
    overrides = {"data.loader": "dali", "data.augment": "pad_crop_flip", "data.pad": 4, "data.pad_mode": "reflect"}
    config = load_config(PRETRAIN, "demo", overrides)
    with pytest.raises(ConfigError) as refused:
        check_loader_options(config)
    assert str(refused.value) == (
        "data.pad_mode=reflect: the dali loader pads with zero only; loaders with reflect padding: torch"
    )
    check_loader_options(load_config(PRETRAIN, "demo", {**overrides, "data.pad": 0}))  # nothing to fill


@pytest.mark.parametrize("backend", sorted(LOADERS))
def test_the_configured_stream_asks_each_backend_only_what_it_honours(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data.ffcv_* keys are FFCV's: another loader is not asked for them (a run may resume through it)."""
    asked = []
    monkeypatch.setitem(LOADERS, backend, replace(LOADERS[backend], train_stream=lambda r: asked.append(r) or iter(())))
    overrides = {"data.loader": backend, "data.ffcv_os_cache": False, "data.ffcv_quasi_random": True}
    config = load_config(PRETRAIN, "demo", overrides)
    place = SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cpu"))
    train_batches(config, SimpleNamespace(), 4, 9, 3, place)
    (request,) = asked
    assert (request.batch_size, request.seed, request.start_step, request.rank, request.world_size) == (4, 9, 3, 1, 2)
    assert (request.os_cache, request.quasi_random) == (
        (False, True) if "os_cache" in LOADERS[backend].options else (True, False)
    )

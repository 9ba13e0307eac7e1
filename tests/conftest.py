import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from helpers import SHARED_DATA, make_tiny_bert  # noqa: E402


@pytest.fixture(autouse=True)
def _library_logging():
    """Each test starts with the `simcse_dist` loggers as a library leaves them (records reach
    the root logger, where caplog sees them), whatever a console script run in-process set up."""
    yield
    logger = logging.getLogger("simcse_dist")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@pytest.fixture(scope="session", autouse=True)
def _token_cache_dir(tmp_path_factory) -> None:
    """Training runs in tests (and their torchrun children) keep token caches in a temp dir,
    not next to the repo's or ../shared's data files."""
    os.environ.setdefault("SIMCSE_CACHE_DIR", str(tmp_path_factory.mktemp("token-cache")))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    # initializer_range 0.3: a random BERT with the default 0.02 maps every sentence to nearly the
    # same [CLS] vector (cosine 0.99999), which makes loss gradients cancellation noise.
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), initializer_range=0.3)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def single_process_group():
    """One in-process gloo group (world size 1) for the whole session: DeepSpeed caches its
    process groups at the first initialize, so a second init after a teardown would hand it
    stale groups ("Group ... is not registered"). The store's address that the init exports is
    taken back out of os.environ: a command a later test starts would inherit MASTER_PORT, the
    port this group's store still holds, and fail to bind it (DeepSpeed still reads LOCAL_RANK)."""
    from simcse_dist import distributed as du

    unset = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    env = du.DistEnv.from_env({})
    du.init_distributed(env, timeout_s=60)
    for key in unset:
        os.environ.pop(key, None)
    yield env
    du.teardown()

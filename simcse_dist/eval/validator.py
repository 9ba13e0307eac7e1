"""STS dev evaluation during training: a part of the run that owns its cadence and its best score."""

from __future__ import annotations

from simcse_dist.eval.encode import pair_embeddings
from simcse_dist.eval.metrics import align_uniform, sts_correlation


class StsValidator:
    """STS dev evaluation during training: decides when (every eval.every_steps and at the end),
    scores, and remembers the best score and its step (a checkpointed part)."""

    def __init__(self, pairs, every_steps: int, batch_size: int, prompt: str = "") -> None:
        """pairs: sts.StsData; prompt: the model's default prompt (as simcse-eval applies it)."""
        self.pairs, self.every_steps, self.batch_size, self.prompt = pairs, every_steps, batch_size, prompt
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.pack_tokens: int | None = None  # set when the trainer packs: the dev set is encoded packed too

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps

    def run(self, engine, tokenizer, step: int) -> tuple[dict[str, float], bool]:
        """(eval/* metrics, whether this is a new best). collective: every rank."""
        engine.eval()
        s1, s2, gold = self.pairs.sentences1, self.pairs.sentences2, self.pairs.scores
        e1, e2 = pair_embeddings(
            engine, tokenizer, s1, s2, engine.device, self.batch_size, pack_tokens=self.pack_tokens, prompt=self.prompt
        )
        engine.train()
        score = sts_correlation(e1, e2, gold)
        metrics = {"eval/stsb_spearman": score}
        if max(gold) > 4.0:  # Wang & Isola's alignment needs positives (gold > 4), as the paper's Fig. 2
            au = align_uniform(e1, e2, gold)
            metrics.update({"eval/align": au["align"], "eval/uniform": au["uniform"]})
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step = score, step
            metrics["eval/best_stsb_spearman"] = score
        return metrics, improved

    def state_dict(self) -> dict:
        return {"score": self.best_score, "step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_step = state["score"], state["step"]

"""Helpers shared by the tests: paths of the shared model and data, a tiny BERT built on the
spot (never downloaded), and Chinese sample texts."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ME5_DIR = SHARED / "models" / "me5-small-zh"
EVAL_DIR = SHARED / "data" / "eval"


def char_vocab() -> dict[str, int]:
    """A character vocabulary: BERT specials, ASCII, CJK punctuation and all common CJK."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ascii_chars = [chr(c) for c in range(33, 127)]
    punctuation = list("。，、；：？！…—·“”‘’（）《》【】「」『』")
    cjk = [chr(c) for c in range(0x4E00, 0x9FA6)]
    return {token: i for i, token in enumerate(specials + ascii_chars + punctuation + cjk)}


def build_tiny_model(directory: Path, *, seed: int = 0, dropout: float = 0.0) -> Path:
    """Save a 2-layer, 32-wide BERT and its WordPiece tokenizer to ``directory``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=char_vocab())
    tokenizer.model_max_length = 128
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


CHINESE_TEXTS = [
    "医保报销需要准备哪些材料？",
    "高血压患者日常饮食应该注意什么",
    "北京故宫的开放时间是几点到几点",
    "如何在网上办理居住证续签",
    "糖尿病人可以吃西瓜吗",
    "异地就医备案的流程是什么？",
    "长城哪一段最适合徒步旅行",
    "个人所得税汇算清缴什么时候截止",
]


# Short answers on the same topics as CHINESE_TEXTS, for pairs and mining pools.
PASSAGES = [
    "报销时需提供身份证、医保卡和费用清单",
    "高血压患者应少盐少油，适量运动",
    "故宫开放时间为上午八点半至下午五点",
    "居住证到期前可在政务网站在线续签",
    "糖尿病患者可少量食用西瓜，注意血糖",
    "异地就医需先在医保平台办理备案",
    "慕田峪长城适合徒步，游客较少",
    "个税汇算清缴截止到每年六月三十日",
    "感冒发烧时要多喝水，注意休息",
    "护照办理需要本人到出入境大厅",
    "公积金可以用来支付房租",
    "颐和园门票旺季三十元",
]


def build_tiny_reranker(directory: Path, *, seed: int = 0) -> Path:
    """A tiny BERT with a fresh one-logit head, saved as a cross-encoder in ``directory``."""
    from peg_rag import Reranker

    encoder_dir = build_tiny_model(directory.with_name(directory.name + "-encoder"), seed=seed)
    torch.manual_seed(seed)
    Reranker.from_pretrained(encoder_dir, new_head=True, device="cpu").save_pretrained(directory)
    return directory


def build_sharp_reranker(directory: Path, passages: list[str]) -> Path:
    """A tiny cross-encoder whose logits spread over about one unit around 0.

    A fresh head on the tiny random BERT gives logits within 1e-4 of each other, too close
    to tell which pair a score belongs to: its weights times 3e4 spread them over about 1
    (the noise of batching, about 1e-8 before, stays far below 1e-3), and its bias moves
    their mean over CHINESE_TEXTS x ``passages`` to 0, where the sigmoid is not flat.
    """
    from peg_rag import Reranker

    reranker = Reranker.from_pretrained(
        build_tiny_reranker(directory.with_name(directory.name + "-flat")), device="cpu"
    )
    head = reranker.model.classifier
    with torch.no_grad():
        head.weight.mul_(3e4)
        head.bias.zero_()
        head.bias.sub_(float(reranker.score_pairs(list(product(CHINESE_TEXTS, passages))).mean()))
    reranker.save_pretrained(directory)
    return directory

"""hqclip_fast.data: webdataset shards -> batches {images, pos_tokens, neg_tokens, tag_ids, keys}.

    from hqclip_fast.data import DataConfig, build_train_loader, build_eval_dataset, ClipTokenizer, TagVocab
"""

from .config import OPENAI_MEAN, OPENAI_STD, DataConfig
from .loader import EvalDataset, TrainLoader, build_eval_dataset, build_train_loader
from .samples import normalize_images
from .tags import TagVocab, normalize_tag
from .tokenizer import ClipTokenizer

__all__ = [
    "OPENAI_MEAN", "OPENAI_STD", "ClipTokenizer", "DataConfig", "EvalDataset", "TagVocab", "TrainLoader",
    "build_eval_dataset", "build_train_loader", "normalize_images", "normalize_tag",
]

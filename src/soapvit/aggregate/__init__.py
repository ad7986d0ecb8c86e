"""Beyond [cls]: pooling heads (CLS, mean, AbMILP) on frozen ViT tokens, probes trained on a
disk cache of features, kNN classification, and CLS-attention statistics per block."""

from .attention import AttentionProfile, attention_profile, cls_attention_statistics, distribution_statistics
from .cache import TokenCache, encode_images
from .heads import POOLS, AbMILPPool, ClsPool, MeanPool, ProbeClassifier, make_pool
from .probe import AbMILPConfig, ProbeReport, ProbeResult, run_probe
from .train import LARS, ProbeConfig, ProbeScore, evaluate_probe, knn_scores, topk_accuracy, train_probe

__all__ = [
    "AttentionProfile", "attention_profile", "cls_attention_statistics", "distribution_statistics",
    "TokenCache", "encode_images", "POOLS", "AbMILPPool", "ClsPool", "MeanPool",
    "ProbeClassifier", "make_pool", "AbMILPConfig", "ProbeReport", "ProbeResult", "run_probe", "LARS", "ProbeConfig",
    "ProbeScore", "evaluate_probe", "knn_scores", "topk_accuracy", "train_probe",
]

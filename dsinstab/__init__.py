"""dsinstab: reproduce, see and fix training instabilities of causal LMs in DeepSpeed."""

__version__ = "0.1.0"

"""Tools for adapter files that need no training: resize (:mod:`.resize`), extract from two models
(:mod:`.extract`), merge several into one (:mod:`.merge_adapters`), all through SVDs of ΔW (:mod:`.svd`), plus
conversion and inspection. Import the module you need; nothing is imported here, so the package stays light."""

"""One module per notebook step: each notebook cell makes one call into these and displays what it returns.

01 ``environment`` · 02 ``model`` · 03 ``data`` · 04 ``annotate`` · 05 ``configure`` · 06 ``train`` · 07 ``save`` ·
08 ``compare`` · 09 ``tools`` (inspect, resize, merge, extract, convert adapters). Every function takes the
workspace first and reads what earlier steps left on disk, so any step runs alone after a runtime restart.
"""

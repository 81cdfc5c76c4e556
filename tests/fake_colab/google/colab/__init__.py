"""A stand-in for Colab's ``google.colab`` package, so the tests run the notebooks' Colab paths outside Colab.

Only what lycolab calls exists: ``drive.mount``, ``userdata.get`` and ``files.upload``. Each behaves as Colab's does
for a user who grants access and picks the files named in the environment (see the submodules).
"""

"""Gaussian Mixture Attention: the engine and its adapter to the mixer contract.

The public functional API (definition, section 5) is re-exported from the package
root, gma_np; core.py is the adapter the model uses (gma_np.mixers.attention).
"""

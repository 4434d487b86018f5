"""Networks that predict the model's parameters in one forward pass (amortized inference).

- :mod:`mvmm.nets.bayes`: the Bayesian segmentation CNN of Dalca et al. (2019) on mvmm's likelihood.
- :mod:`mvmm.nets.regnet`: a VoxelMorph-style registration network.
- :mod:`mvmm.nets.velocity`: the U-Net + stationary velocity field both share.
- :mod:`mvmm.nets.data`: cases on their network grids, augmentation, subject tables.
- :mod:`mvmm.nets.train`: the training loop; :mod:`mvmm.nets.model_dir`: model directories.

See docs/nets.md. MONAI is imported only when a network is built.
"""

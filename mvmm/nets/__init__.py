"""Networks that predict the model's parameters in one forward pass (amortized inference).

- :mod:`mvmm.nets.bayes`: the Bayesian segmentation CNN of Dalca et al. (2019) on mvmm's likelihood.
- :mod:`mvmm.nets.prior`, :mod:`mvmm.nets.vae_seg`: the anatomical prior of Dalca et al. (2018), a VAE
  on label maps, and the segmentation network on it.
- :mod:`mvmm.nets.acwe`: the Chan–Vese CNN of Chen & Frey (2020).
- :mod:`mvmm.nets.regnet`: a VoxelMorph-style registration network.
- :mod:`mvmm.nets.velocity`: the U-Net + stationary velocity field both share.
- :mod:`mvmm.nets.data`: cases on their network grids, augmentation, subject tables.
- :mod:`mvmm.nets.train`: the training loop; :mod:`mvmm.nets.model_dir`: model directories.

See docs/nets.md. MONAI is imported only when a network is built.
"""

"""The folder that ``nnUNet_extTrainer`` points to (see :func:`beseg.nnunet.trainer_dir`).

nnU-Net imports each module in it as a top-level module (``beseg_be_trainers``), so the modules
use absolute imports only. Importing this package imports nothing from nnU-Net.
"""

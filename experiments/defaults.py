"""Do the downstream models train with their default arguments? Real OASIS slices, a CPU budget.

    python experiments/defaults.py --data ../shared/data/oasis-sample            # the defaults
    python experiments/defaults.py --data ../shared/data/oasis-sample --learning-rate 1e-4 \
        --similarity mse --reg-weight 0.01 --svf-resolution 1 --seg-epochs 0     # voxelmorph's defaults
"""
from cifl_tf.experiments import defaults_main

if __name__ == "__main__":
    defaults_main()

"""Sample-quality evaluation: the FID Inception network and ADM's metrics."""

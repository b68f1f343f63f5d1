import numpy as np

def bucket(
    values: np.ndarray, table: np.ndarray, counts: np.ndarray, sums: bool, /
) -> tuple[float, float, int, int, int, float, float]: ...

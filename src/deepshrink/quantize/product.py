"""Product and residual quantization of fully connected weight matrices (Gong et al. 2014).

A weight matrix W (m rows x n columns) is compressed row-vector-wise:
- product quantization splits the columns into s groups of n/s and runs k-means on the m
  row segments of each group: storage is s codebooks of k x (n/s) floats plus m x s codes of
  log2(k) bits. Compression rate (32 m n) / (32 k n + log2(k) m s).
- residual quantization runs k-means on whole rows, then again on what is left over, t times:
  storage t codebooks of k x n floats plus t x m codes. Rate (32 m n) / (t log2(k) m + 32 t k n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deepshrink.errors import ConfigError


def vector_kmeans(rows: torch.Tensor, clusters: int, seed: int = 0, max_iterations: int = 200):
    """k-means on row vectors: k-means++ seeding, then Lloyd until assignments stop changing.

    Args:
        rows: the vectors, one per row.
        clusters: k, at most the number of rows.
        seed: the seed of the seeding.
        max_iterations: a bound on Lloyd's iterations.

    Returns:
        (centroids, labels).

    Raises:
        ConfigError: `clusters` out of range.
    """
    rows = rows.detach().double()
    count = rows.shape[0]
    if not 1 <= clusters <= count:
        raise ConfigError(f"clusters={clusters} should be between 1 and the number of rows ({count})")
    generator = torch.Generator().manual_seed(seed)
    centroids = rows[torch.randint(count, (1,), generator=generator)]
    for _ in range(1, clusters):
        distance = torch.cdist(rows, centroids).min(dim=1).values ** 2
        total = distance.sum()
        if total == 0:
            choice = torch.randint(count, (1,), generator=generator)
        else:
            choice = torch.multinomial(distance / total, 1, generator=generator)
        centroids = torch.cat([centroids, rows[choice]])
    labels = torch.full((count,), -1, dtype=torch.long)
    for _ in range(max_iterations):
        new_labels = torch.cdist(rows, centroids).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, rows)
        counts = torch.bincount(labels, minlength=clusters).unsqueeze(1)
        filled = counts.squeeze(1) > 0
        centroids[filled] = sums[filled] / counts[filled]
    return centroids.float(), labels


@dataclass
class ProductQuantized:
    codebooks: list[torch.Tensor]  # s codebooks, each k x (n/s)
    codes: torch.Tensor  # m x s
    shape: tuple[int, int]

    def reconstruct(self) -> torch.Tensor:
        """The approximated matrix: each sub-vector replaced by its centroid.

        Returns:
            The (rows, columns) matrix.
        """
        return torch.cat([codebook[self.codes[:, index]] for index, codebook in enumerate(self.codebooks)], dim=1)

    @property
    def compression_rate(self) -> float:
        """The 32-bit matrix's bits over the codebooks' and codes' bits."""
        rows, columns = self.shape
        clusters, groups = self.codebooks[0].shape[0], len(self.codebooks)
        return 32 * rows * columns / (32 * clusters * columns + math.log2(max(clusters, 2)) * rows * groups)


@dataclass
class ResidualQuantized:
    codebooks: list[torch.Tensor]  # t codebooks, each k x n
    codes: list[torch.Tensor]  # t code vectors of length m
    shape: tuple[int, int]

    def reconstruct(self) -> torch.Tensor:
        """The approximated matrix: the sum of every stage's centroids.

        Returns:
            The (rows, columns) matrix.
        """
        return sum(codebook[codes] for codebook, codes in zip(self.codebooks, self.codes, strict=True))

    @property
    def compression_rate(self) -> float:
        """The 32-bit matrix's bits over the codebooks' and codes' bits."""
        rows, columns = self.shape
        clusters, stages = self.codebooks[0].shape[0], len(self.codebooks)
        return 32 * rows * columns / (stages * math.log2(max(clusters, 2)) * rows + 32 * stages * clusters * columns)


def product_quantize(weight: torch.Tensor, subspaces: int, clusters: int, seed: int = 0) -> ProductQuantized:
    """Product quantization (Gong et al. 2014): the columns cut into `subspaces` groups, each
    group's row vectors clustered by k-means.

    Args:
        weight: a 2-D matrix.
        subspaces: how many column groups; must divide the columns.
        clusters: centroids per group.
        seed: the seed of k-means.

    Returns:
        The ProductQuantized codebooks and codes.

    Raises:
        ConfigError: not 2-D, or `subspaces` does not divide the columns.
    """
    if weight.dim() != 2:
        raise ConfigError(f"product quantization takes a 2-D weight matrix, got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if subspaces < 1 or columns % subspaces:
        raise ConfigError(f"subspaces={subspaces} should divide the {columns} columns evenly")
    width = columns // subspaces
    codebooks, codes = [], []
    for index in range(subspaces):
        codebook, labels = vector_kmeans(weight[:, index * width : (index + 1) * width], clusters, seed + index)
        codebooks.append(codebook)
        codes.append(labels)
    return ProductQuantized(codebooks, torch.stack(codes, dim=1), (rows, columns))


def residual_quantize(weight: torch.Tensor, stages: int, clusters: int, seed: int = 0) -> ResidualQuantized:
    """Residual quantization: k-means on the rows, then on what is left, `stages` times.

    Args:
        weight: a 2-D matrix.
        stages: how many stages.
        clusters: centroids per stage.
        seed: the seed of k-means.

    Returns:
        The ResidualQuantized codebooks and codes.

    Raises:
        ConfigError: not 2-D, or `stages` below 1.
    """
    if weight.dim() != 2:
        raise ConfigError(f"residual quantization takes a 2-D weight matrix, got shape {tuple(weight.shape)}")
    if stages < 1:
        raise ConfigError(f"stages={stages} should be at least 1")
    residual = weight.detach().float().clone()
    codebooks, codes = [], []
    for stage in range(stages):
        codebook, labels = vector_kmeans(residual, clusters, seed + stage)
        codebooks.append(codebook)
        codes.append(labels)
        residual = residual - codebook[labels]
    return ResidualQuantized(codebooks, codes, tuple(weight.shape))

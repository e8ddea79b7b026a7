"""The skeleton shared by every strategy: the leaf table, member arithmetic, the population vmap, fitness checks.

A strategy supplies only its own maths, as a :class:`Perturbation`: how to draw one pair's noise (``pair_noise``)
and how to build one member's view from it (``member_view``). What turns those into ``ask``, ``view`` and
``evaluate`` -- which members form a pair, which sign a member carries, which group (key and data slice) it
belongs to, the vmaps over pairs and members -- is written here once, for ``eggroll``, ``open_es`` and
``int_eggroll`` alike.

Member arithmetic (``N = population_size`` members, ``P`` pairs, groups of ``group_size``):

* with antithetic sampling, members ``2k`` and ``2k + 1`` form pair ``k`` (``P = N / 2``), share its noise and
  carry the signs ``+1`` / ``-1``; without it, member ``i`` is its own pair ``i`` (``P = N``) with sign ``+1``;
* member ``i`` belongs to group ``i // group_size``: its evaluation key is ``fold_in(key, group)``, and its data
  ``data[group]`` with ``data_per_group`` (``data[i]`` with ``data_per_member``, ``data`` otherwise).

Member batching (``member_batch = K``, docs/hyperscale.md): the pairs are split into consecutive chunks of
``K / per_pair`` pairs (``K`` members); ``evaluate`` runs the chunks one after another (``lax.map``) and a strategy's
``gradient`` sums its per-chunk contractions in a ``lax.scan`` (:func:`chunk_sum`), each chunk drawing its own noise
inside the loop body, so no more than one chunk's factors and activations are alive at once. ``K`` divides ``N``
(and is even with antithetic sampling: a chunk holds whole pairs); a ``pairs=`` subset of ``P'`` pairs (a device's
share) uses chunks of ``min(K / per_pair, P')`` pairs, which must divide ``P'``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from esx import labels as labels_lib
from esx import noise as noise_lib
from esx.base import FitnessFn, State


class LeafTable(NamedTuple):
    """The static description of a parameter pytree, in flattening order.

    Attributes:
      treedef: the tree structure of the parameters.
      paths: ``L`` path strings (``"enc/w"``); a leaf's noise id is :func:`esx.noise.leaf_id` of its path.
      labels: ``L`` labels, ``"lowrank"`` / ``"full"`` / ``"frozen"`` (a ``"lowrank:k"`` label is ``"lowrank"``
        here, with its ``k`` in ``rows``).
      rows: ``L`` entries, ``k`` for a tensor leaf labelled ``"lowrank:k"`` (one matrix whose rows are its first
        ``k`` axes), else ``None``.
    """

    treedef: Any
    paths: list
    labels: list
    rows: list | None = None

    def matrix_shape(self, i: int, shape: tuple) -> tuple:
        """The shape leaf ``i``'s noise is drawn for: ``shape`` itself, or ``(prod(shape[:k]), prod(shape[k:]))``
        for a tensor leaf."""
        k = self.rows[i] if self.rows else None
        return tuple(shape) if k is None else (math.prod(shape[:k]), math.prod(shape[k:]))


def resolve_labels(params: Any, spec: Any, lowrank: bool) -> list[str]:
    """The ``L`` labels of ``params`` (flattening order) from a label ``spec`` (as :func:`esx.make_labels`, or a
    label pytree); with ``lowrank=False`` every ``"lowrank"`` label becomes ``"full"``."""
    labeller = callable(spec) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(spec))
    if spec is None or labeller or (
        isinstance(spec, Mapping) and all(isinstance(v, str) for v in spec.values())
    ):
        tree = labels_lib.make_labels(params, spec)
    else:
        labels_lib.check_labels(params, spec)
        tree = spec
    flat = jax.tree_util.tree_structure(params).flatten_up_to(tree)
    if not lowrank:
        flat = [labels_lib.FULL if labels_lib.split(lab)[0] == labels_lib.LOWRANK else lab for lab in flat]
    return list(flat)


def leaf_table(params: Any, spec: Any, *, lowrank: bool, tensors: bool = True) -> LeafTable:
    """The :class:`LeafTable` of ``params`` under the label ``spec`` (see :func:`resolve_labels`); ``ValueError``
    for a ``"lowrank:k"`` label when the strategy takes no tensor leaves (``tensors=False``)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [labels_lib.path_to_str(p) for p, _ in flat]
    kinds, rows = zip(*map(labels_lib.split, resolve_labels(params, spec, lowrank))) if flat else ((), ())
    if not tensors and any(k is not None for k in rows):
        bad = [p for p, k in zip(paths, rows) if k is not None]
        raise ValueError(f"labels: tensor labels 'lowrank:k' are not supported by this strategy (leaves {bad}); "
                         "label them 'lowrank' (stacked matrices) or 'full'")
    return LeafTable(treedef, paths, list(kinds), list(rows))


def check_key(key: Any) -> jax.Array:
    """``init``'s base key: a typed PRNG key, or the raw ``uint32[2]`` data of one (wrapped); else ``TypeError``."""
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(key)
        raise TypeError("init: key must be a PRNG key from jax.random.key(seed)")
    return key


def check_leaves(table: LeafTable, params: Any, check_leaf: Callable[[str, Any, str], None]) -> None:
    """Checks every leaf once at ``init``: ``check_leaf(path, leaf, label)`` (the strategy's own dtype and shape
    rules), then that no two non-frozen leaves share a noise id. Raises ``ValueError`` / ``TypeError``."""
    seen: dict[int, str] = {}
    for path, leaf, lab in zip(table.paths, jax.tree_util.tree_leaves(params), table.labels):
        check_leaf(path, leaf, lab)
        lid = noise_lib.leaf_id(path)
        if lid in seen and lab != labels_lib.FROZEN:
            raise ValueError(f"init: leaves {seen[lid]!r} and {path!r} share a noise id; rename one")
        seen[lid] = path


def check_fitness(fitness: Any, population_size: int) -> jax.Array:
    """``fitness: float[N] or int[N]`` as an array (dtype kept); ``ValueError`` for another shape, ``TypeError``
    for a dtype that is not a real float or integer (bool, complex)."""
    fitness = jnp.asarray(fitness)
    if fitness.shape != (population_size,):
        raise ValueError(
            f"tell: fitness must have shape ({population_size},) (population_size), got {fitness.shape}")
    if not (jnp.issubdtype(fitness.dtype, jnp.floating) or jnp.issubdtype(fitness.dtype, jnp.integer)):
        raise TypeError(f"tell: fitness must be a real float or integer array, got dtype {fitness.dtype}")
    return fitness


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _listing(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 24 else (
        ", ".join(map(str, values[:12])) + ", ..., " + ", ".join(map(str, values[-4:])))


def check_member_batch(member_batch: Any, population_size: int, antithetic: bool) -> int | None:
    """``member_batch`` as an ``int`` (or ``None``: every member at once); ``ValueError`` naming the valid values
    unless it is a positive integer dividing ``population_size`` (and even with antithetic sampling)."""
    if member_batch is None:
        return None
    per = 2 if antithetic else 1
    valid = [d for d in _divisors(population_size) if d % per == 0]
    if isinstance(member_batch, (bool, np.bool_)) or not isinstance(member_batch, (int, np.integer)) \
            or int(member_batch) not in valid:
        even = " and even (a chunk holds whole antithetic pairs)" if antithetic else ""
        raise ValueError(
            f"member_batch={member_batch!r}; must be None (every member at once) or a positive integer that divides "
            f"population_size={population_size}{even}; valid values: {_listing(valid)}")
    return int(member_batch)


@dataclasses.dataclass(frozen=True)
class Members:
    """The member / pair / sign / group arithmetic of a population (see the module docstring); ``member_batch``
    (``None``: unbatched) is the number of members evaluated, and contracted, per chunk."""

    population_size: int
    group_size: int
    antithetic: bool
    member_batch: int | None = None

    @property
    def num_pairs(self) -> int:
        """``P``: ``N / 2`` with antithetic sampling, else ``N``."""
        return self.population_size // 2 if self.antithetic else self.population_size

    @property
    def per_pair(self) -> int:
        """Members per pair: 2 with antithetic sampling, else 1."""
        return 2 if self.antithetic else 1

    @property
    def num_groups(self) -> int:
        """``N / group_size``."""
        return self.population_size // self.group_size

    def pairs(self, pairs: jax.Array | None = None) -> jax.Array:
        """``int32[P']``: the given pairs, or all ``P`` of them."""
        if pairs is None:
            pairs = jnp.arange(self.num_pairs, dtype=jnp.int32)
        return jnp.asarray(pairs, jnp.int32)

    def members_of(self, pairs: jax.Array) -> jax.Array:
        """``int32[P'] -> int32[P', per_pair]``: the members of each pair."""
        per = self.per_pair
        return pairs[:, None] * per + jnp.arange(per, dtype=jnp.int32)[None, :]

    def pair_of(self, member: jax.Array) -> jax.Array:
        """``int32[] -> int32[]``: the pair (noise draw) of a member."""
        return member // 2 if self.antithetic else member

    def sign_of(self, member: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """``int32[] -> dtype[]``: the antithetic sign ``+1`` (even member) / ``-1`` (odd), or ``1``."""
        if not self.antithetic:
            return jnp.ones((), dtype)
        if jnp.issubdtype(dtype, jnp.floating):
            return 1.0 - 2.0 * (member % 2).astype(dtype)
        return 1 - 2 * (member % 2).astype(dtype)

    def group_of(self, member: jax.Array) -> jax.Array:
        """``int32[] -> int32[]``: the group of a member (shares the evaluation key and data slice)."""
        return member // self.group_size

    def chunks(self, pairs: jax.Array) -> jax.Array | None:
        """``int32[P'] -> int32[C, c]``: ``pairs`` in consecutive chunks of ``c = min(member_batch / per_pair, P')``
        pairs, or ``None`` when unbatched (no ``member_batch``, or one chunk would hold every pair).

        Raises ``ValueError`` (at trace time) when ``c`` does not divide ``P'``, naming the valid values."""
        n = pairs.shape[0]
        if self.member_batch is None or n == 0:
            return None
        c = min(self.member_batch // self.per_pair, n)
        if c == n:
            return None
        if n % c:
            valid = [d * self.per_pair for d in _divisors(n)]
            raise ValueError(
                f"member_batch={self.member_batch}: these {n} pairs ({n * self.per_pair} members, e.g. one device's "
                f"share) do not split into chunks of {c} pairs; valid member_batch values here: {_listing(valid)} "
                f"(or larger: one chunk)")
        return pairs.reshape(n // c, c)


class Perturbation(NamedTuple):
    """What a strategy supplies to the skeleton.

    Attributes:
      table_of: ``params -> LeafTable``.
      pair_noise: ``(state, table, pair: int32[]) -> list`` the noise of one pair, one entry per leaf.
      member_view: ``(state, table, noise, sign) -> pytree`` one member's view of the parameters.
      sign_dtype: the dtype of the sign handed to ``member_view`` (``float32``, or ``int32`` for integers).
      population: the class of ``ask``'s result, built as ``population(noise=..., sigma=state.sigma)``.
      sign_major: the member axes of ``evaluate``'s vmap are ``[per_pair, P]`` (signs outer, the noise of all
        pairs drawn first) rather than ``[P, per_pair]`` (pairs outer, each pair's noise drawn inside). Same
        values; with a minor member axis of size 2, XLA:CPU's code for a fitness function's own per-member
        elementwise work (e.g. an RL rollout's PRNG calls in every step) ran 2x slower.
    """

    table_of: Callable[[Any], LeafTable]
    pair_noise: Callable[[State, LeafTable, jax.Array], list]
    member_view: Callable[[State, LeafTable, list, jax.Array], Any]
    sign_dtype: Any
    population: type
    sign_major: bool


def chunk_sum(members: Members, pairs: jax.Array, contract: Callable[[jax.Array], Any]) -> Any:
    """``contract(pairs)`` (a pytree of per-pair sums, e.g. one gradient term per leaf), or with member batching the
    sum over the chunks of ``pairs`` of ``contract(chunk)``, accumulated in a ``lax.scan`` (in float32 or wider for
    floating leaves, in the leaf's dtype for integers; chunks added in order, so the result is deterministic)."""
    chunks = members.chunks(pairs)
    if chunks is None:
        return contract(pairs)

    def acc_dtype(dtype):
        return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype

    shapes = jax.eval_shape(contract, chunks[0])
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, acc_dtype(s.dtype)), shapes)

    def body(acc, chunk):
        return jax.tree_util.tree_map(lambda a, x: a + x.astype(a.dtype), acc, contract(chunk)), None

    return jax.lax.scan(body, init, chunks)[0]


def pair_noises(perturbation: Perturbation, state: State, table: LeafTable, pairs: jax.Array) -> list:
    """The noise of the pairs ``pairs: int32[P']``: each leaf's entry gets a leading axis ``P'``."""
    return jax.vmap(lambda p: perturbation.pair_noise(state, table, p))(pairs)


def ask(members: Members, perturbation: Perturbation, state: State) -> Any:
    """All ``P`` pairs' noise, pre-generated: ``population(noise=[leaf: [P, ...]], sigma=state.sigma)``."""
    table = perturbation.table_of(state.params)
    noise = pair_noises(perturbation, state, table, jnp.arange(members.num_pairs, dtype=jnp.int32))
    return perturbation.population(noise=noise, sigma=state.sigma)


def view(members: Members, perturbation: Perturbation, state: State, population: Any, member: jax.Array) -> Any:
    """Member ``member: int32[]``'s perturbed view, from ``ask``'s ``population``."""
    table = perturbation.table_of(state.params)
    member = jnp.asarray(member, jnp.int32)
    noise = jax.tree_util.tree_map(lambda x: x[members.pair_of(member)], population.noise)
    return perturbation.member_view(state, table, noise, members.sign_of(member, perturbation.sign_dtype))


def _check_data(members: Members, data: Any, data_per_group: bool, data_per_member: bool) -> None:
    if data_per_group and data_per_member:
        raise ValueError("evaluate: choose data_per_group or data_per_member, not both")
    if data_per_group:
        lead = members.num_groups
        need = f"data_per_group=True needs a leading axis of {lead} groups (population_size / group_size)"
    elif data_per_member:
        lead = members.population_size
        need = f"data_per_member=True needs a leading axis of {lead} members (population_size)"
    else:
        return
    for x in jax.tree_util.tree_leaves(data):
        if np.shape(x)[:1] != (lead,):
            raise ValueError(f"evaluate: {need} on every data leaf, got shape {np.shape(x)}")


def evaluate(members: Members, perturbation: Perturbation, state: State, fitness_fn: FitnessFn, key: jax.Array,
             data: Any = None, *, data_per_group: bool = False, data_per_member: bool = False,
             has_aux: bool = False, pairs: jax.Array | None = None) -> Any:
    """The fitness of every member (of the given ``pairs``), in member order.

    Args:
      members, perturbation: the population's arithmetic and the strategy's maths.
      state: the :class:`esx.State`.
      fitness_fn: ``(view, key, data) -> float[]`` (or ``(float[], aux)`` with ``has_aux``); ``key`` is
        ``fold_in(key, group)``.
      key: the evaluation key of this generation.
      data: shared, or ``[num_groups, ...]`` per leaf with ``data_per_group``, or ``[N, ...]`` with
        ``data_per_member``.
      pairs: ``int32[P']``; default all ``P`` pairs. With ``members.member_batch`` they are evaluated one chunk
        of ``member_batch`` members at a time (:meth:`Members.chunks`); the same values, in the same order.

    Returns:
      ``float[P' · per_pair]`` (the fitness dtype), and with ``has_aux`` the aux pytree with that leading axis.
    """
    _check_data(members, data, data_per_group, data_per_member)
    table = perturbation.table_of(state.params)
    pairs = members.pairs(pairs)

    def one_member(noise, member):
        group = members.group_of(member)
        mkey = jax.random.fold_in(key, group.astype(jnp.uint32))
        if data_per_group:
            d = jax.tree_util.tree_map(lambda x: x[group], data)
        elif data_per_member:
            d = jax.tree_util.tree_map(lambda x: x[member], data)
        else:
            d = data
        sign = members.sign_of(member, perturbation.sign_dtype)
        out = fitness_fn(perturbation.member_view(state, table, noise, sign), mkey, d)
        f = out[0] if has_aux else out
        if jnp.shape(f) != ():
            raise ValueError(f"evaluate: fitness_fn must return a scalar per member, got shape {jnp.shape(f)}")
        return out

    def some_pairs(pairs):
        member_ids = members.members_of(pairs)
        if perturbation.sign_major:
            noise = pair_noises(perturbation, state, table, pairs)
            out = jax.vmap(lambda ms: jax.vmap(one_member)(noise, ms))(member_ids.T)
            return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), out)

        def one_pair(pair, mem):
            noise = perturbation.pair_noise(state, table, pair)
            return jax.vmap(lambda m: one_member(noise, m))(mem)

        out = jax.vmap(one_pair)(pairs, member_ids)
        return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), out)

    chunks = members.chunks(pairs)
    if chunks is None:
        return some_pairs(pairs)
    out = jax.lax.map(some_pairs, chunks)   # one chunk of members at a time, its noise drawn inside the body
    return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def population_functions(members: Members, perturbation: Perturbation) -> tuple[Callable, Callable, Callable]:
    """The strategy's ``ask(state)``, ``view(state, population, member)`` and ``evaluate(state, fitness_fn, key,
    data=None, *, data_per_group=False, data_per_member=False, has_aux=False, pairs=None)``."""

    def ask_(state: State) -> Any:
        return ask(members, perturbation, state)

    def view_(state: State, population: Any, member: jax.Array) -> Any:
        return view(members, perturbation, state, population, member)

    def evaluate_(state: State, fitness_fn: FitnessFn, key: jax.Array, data: Any = None, *,
                  data_per_group: bool = False, data_per_member: bool = False, has_aux: bool = False,
                  pairs: jax.Array | None = None) -> Any:
        return evaluate(members, perturbation, state, fitness_fn, key, data, data_per_group=data_per_group,
                        data_per_member=data_per_member, has_aux=has_aux, pairs=pairs)

    return ask_, view_, evaluate_

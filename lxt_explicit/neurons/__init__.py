"""Knowledge neurons: find, label, verify and steer the latent units relevance points to.

* :mod:`~lxt_explicit.neurons.find`: the most relevant MLP neurons, attention heads and
  autoencoder features per layer over one explanation or many (a table, ``to_pandas()``, a report);
* :mod:`~lxt_explicit.neurons.label`: activation maximization over a corpus, by activation and by
  relevance for the model's own next-token predictions;
* :mod:`~lxt_explicit.neurons.verify`: ablation curves, relevance-selected units against the most
  activated and random units;
* :mod:`~lxt_explicit.neurons.steer`: set, scale or shift units while the model runs;
* :mod:`~lxt_explicit.neurons.sae`: a user's sparse autoencoder inserted at a site, its features
  units like neurons (:mod:`~lxt_explicit.neurons.training` trains a small one).

Units are named by specs (:mod:`lxt_explicit.latent`): ``'mlp:K'``, ``'heads:K'``, ``'sae:SITE'``.
"""

from .find import UnitStats, UnitTable, find_units, unit_relevance
from .label import UnitLabel, Window, iter_corpus, label_units
from .sae import SAEInsertion, SparseAutoencoder, as_autoencoder, insert_sae, sae_relevance
from .steer import Steering, steer
from .training import site_activations, train_sae
from .units import ActivationRecorder, UnitPoint, unit_point
from .verify import SELECTIONS, AblationCurves, ablation_curves

__all__ = [
    "AblationCurves",
    "SELECTIONS",
    "UnitLabel",
    "UnitStats",
    "UnitTable",
    "Window",
    "ablation_curves",
    "find_units",
    "iter_corpus",
    "label_units",
    "unit_relevance",
    "ActivationRecorder",
    "SAEInsertion",
    "SparseAutoencoder",
    "Steering",
    "UnitPoint",
    "as_autoencoder",
    "insert_sae",
    "sae_relevance",
    "site_activations",
    "steer",
    "train_sae",
    "unit_point",
]

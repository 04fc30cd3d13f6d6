"""What stages leave on disk: each file format has one writer and one reader, one module per concern.

- ``manifest``: every output folder's ``config.yaml`` + ``manifest.json`` (``write_manifest``/``read_manifest``),
  the one resume guard (``reusable``), provenance digests (``guard_inputs``), headers of reusable tensor files
  (``settings_header``/``load_if_header``), the seals of a method's files (``seal_files``); ``accuracy.json``
  (``ACCURACY_FILE``) and ``metrics.json`` (``METRICS_FILE``) are named here;
- ``lock``: the one writer of a folder (``output_lock``, ``locked_stage``: an ``flock`` held for the stage's life);
- ``cards``: model cards (teachers and students): ``model.safetensors`` + ``card.json`` (``save_model``/
  ``load_model``, ``find_teachers``) and the label-teacher policy (``load_labelers``);
- ``distilled``: a distilled set: ``images/<class>/<class>_<ipc>.png`` + ``records/batch_*.json`` (``image_path``,
  ``save_image``, ``load_distilled``), sealed per PNG (``seal_distilled``, ``check_finished_images``), and centred
  one-hot label vectors (a method's own label vectors, FRePo's learned labels, are read through
  ``methods.labels.LABEL_SOURCES``);
- ``labels``: soft labels, ``epoch_NNNN.safetensors`` (``pack_logits``/``StoredLabels``);
- ``scores``: per-example scores of a training split (``scores.safetensors``: embeddings, entropies, training
  dynamics), written by the score stage and read by the selection methods (``save_scores``/``load_scores``).

A method's own files live in its module (G-VBSM/EDC statistics: ``methods.stats``/``methods.edc``; D4M's
prototypes: ``methods.d4m``). Stages import this package and ``core``, never each other. The names below are the
package's API: import them from ``prismdd.artifacts``.
"""
from .cards import (REFERENCE_LABEL_TEACHERS, WEIGHTS_DIGEST, check_finite_state, find_one_teacher, find_teachers,
                    label_teacher_names, load_labelers, load_model, save_model, weights_problem)
from .distilled import (IMAGE_DIGEST, SET_DIGEST, DistilledSet, centred_onehot, check_finished_images, class_dirname,
                        image_path, load_distilled, record_path, save_image, seal_distilled, with_distilled_dataset)
from .labels import (LABEL_KEYS, StoredLabels, check_finite_labels, consumed_digests, epoch_file, label_bytes,
                     pack_logits, unpack_logits)
from .scores import (SCORE_KINDS, SCORES_FILE, SCORES_FORMAT, Scores, check_kinds, load_scores, save_scores,
                     score_settings)
from .lock import LOCK_FILE, locked_stage, output_lock
from .manifest import (ACCURACY_FILE, CARD, INPUTS_FILE, MANIFEST, METRICS_FILE, SEALED_FILES, WEIGHTS, check_inputs,
                       check_sealed_file, clear_outputs, file_digest, guard_inputs, images_digest, load_if_header,
                       read_manifest, reusable, seal_files, sealed_in, settings_header, teacher_digests, versions,
                       write_manifest)

__all__ = ["ACCURACY_FILE", "CARD", "DistilledSet", "IMAGE_DIGEST", "INPUTS_FILE", "LABEL_KEYS",
           "LOCK_FILE", "MANIFEST", "METRICS_FILE", "REFERENCE_LABEL_TEACHERS", "SCORE_KINDS", "SCORES_FILE", "SCORES_FORMAT", "SEALED_FILES", "Scores", "SET_DIGEST",
           "StoredLabels", "WEIGHTS", "WEIGHTS_DIGEST", "centred_onehot", "check_finished_images", "check_kinds",
           "check_finite_labels", "check_finite_state", "check_inputs", "check_sealed_file", "class_dirname",
           "clear_outputs", "consumed_digests", "epoch_file", "file_digest", "find_one_teacher", "find_teachers",
           "guard_inputs", "image_path", "images_digest", "label_bytes", "label_teacher_names",
           "load_distilled", "load_if_header", "load_scores", "load_labelers", "load_model", "locked_stage",
           "output_lock", "pack_logits", "read_manifest", "record_path", "reusable",
           "save_image", "save_model", "save_scores", "score_settings", "seal_distilled", "seal_files", "sealed_in",
           "settings_header",
           "teacher_digests", "unpack_logits", "versions", "weights_problem", "with_distilled_dataset",
           "write_manifest"]

"""A procedural synthetic head: a stand-in morphable model that needs no download.

The Basel Face Model behind 300W-LP and AFLW2000-3D is distributed only after registration, so
a fresh clone cannot fetch it. :func:`build_synthetic_head` builds, deterministically and in well
under a second, a closed head mesh with the BFM's units and axes, the 68 iBUG landmarks as fixed
vertices, 40 identity and 10 expression modes, and per-vertex colours, so the whole pipeline
(rendering, labels, training, evaluation) runs end to end. Nothing here is fitted to real faces:
figures measured on faces rendered from it are synthetic figures.

Frame and units: the BFM's as trimmed by 3DDFA, about a micrometre per unit (a face is ~150000
wide), x toward the subject's left (image-left is x < 0 in a frontal view), y up, z toward the
camera.

Expression modes, in coefficient order: ``jaw_open``, ``smile``, ``frown``, ``lip_pucker``,
``brow_raise``, ``brow_furrow``, ``eyes_close``, ``wink_image_left``, ``cheek_puff``,
``wink_image_right`` (:data:`EXPRESSION_NAMES`; see :mod:`.bases`).

Regions (``vertex_region``, class constants of :class:`SyntheticHead`): 0 SKIN, 1 LIPS,
2 EYEBROW, 3 SCLERA, 4 IRIS, 5 PUPIL, 6 HAIR, 7 MOUTH_INTERIOR, 8 NOSTRIL, 9 LASH.

Modules, in build order: :mod:`.chart` (frame, face chart, smooth shapes), :mod:`.features`
(feature curves), :mod:`.mesh` (vertex directions, triangles), :mod:`.surface` (the mean
surface), :mod:`.landmarks`, :mod:`.paint` (regions, colours), :mod:`.bases` (modes),
:mod:`.head` (the assembled head).
"""

from models.synthetic_face.bases import EXPRESSION_NAMES
from models.synthetic_face.head import SyntheticHead, build_synthetic_head
from models.synthetic_face.mesh import vertex_normals
from models.synthetic_face.paint import REGION_NAMES

__all__ = ["EXPRESSION_NAMES", "REGION_NAMES", "SyntheticHead", "build_synthetic_head", "vertex_normals"]

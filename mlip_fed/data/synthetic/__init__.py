"""SynthCXR: procedural frontal chest radiographs with spatial ground truth, across simulated hospitals.

Every quality number of the project is measured here until a hospital connects real data, so the
generator aims to be *worth measuring on*: anatomy varies per patient, findings are small and low in
contrast, sites differ in acquisition (contrast, gamma, noise, blur, field of view, markers) and in
case mix, and follow-up studies of one patient share anatomy and persistent findings. A linear model
on raw pixels should do clearly better than chance but far from perfect (see ``docs/synthcxr.md``).

One module per job, each importing only the ones above it in this list:

- ``findings``: the finding table, the difficulty tiers, the ``Finding`` record;
- ``sampling``: site profiles, patients, studies and their findings (keyed random streams);
- ``render``: one exposure's pixels, masks and boxes;
- ``reports``: one study's report text and its CheXpert labels;
- ``write``: sites on disk (``generate_federation``), in the manifest format of ``mlip_fed.data.manifest_writer``.
"""

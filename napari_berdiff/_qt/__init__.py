"""Everything that imports Qt, napari or magicgui lives here (DESIGN §2).

Submodules:

- ``_widget``: the "Diffusion segmentation" dock widget, which composes
- ``_model_panel`` (load a model, device, summary),
- ``_sampling_panel`` (image, region, volume mode, settings, Sample / Cancel),
- ``_results_panel`` (browse, accept, consensus) and ``_metrics_panel`` (IoU, GED², HM-IoU);
- ``_inputs`` turns the panels' choices into a validated sampling job (bad input → notification),
- ``_run`` is the generator the ``thread_worker`` runs, ``_layers`` the live result layers,
- ``_accept`` writes masks into a target Labels layer as one undoable step,
- ``_sample_data`` is the "phantom lesion with annotators" sample;
- ``_presentation`` the presentation view and the animation export (``_present_command`` its
  menu command), ``_reference_view`` the reference annotators on layers of their own,
  ``_status`` the status line after a run, ``_reader_preference`` makes napari open NIfTI
  with our reader without asking.

Nothing is imported here, so importing this package stays cheap and does not import torch.
"""

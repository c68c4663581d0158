r"""Throughput of the deep MIL training step, evaluation, input pipeline and preprocessing.

    python -m deepmil_jax.benchmark [--scheme=label_assign] [--backbone=caffe] [--json=PATH]
    python -m deepmil_jax.benchmark --quick          # tiny sizes, few repeats (CI smoke test)
    python -m deepmil_jax.benchmark --parts=train,eval,torch   # no TensorFlow or DICOM stack

Every figure is a median over ``--repeats`` timed repeats after ``--warmup`` untimed steps; each
part has its own timer module:

=================================  ==============================================================
``train_images_per_sec``           ``train_timer``: ``deepmil_jax.train.Trainer.step_on_devices``
                                   (model, ``train.scheme_loss`` + L2, Adam) on a fixed batch
                                   already sharded over the devices (``Trainer.to_global``)
``eval_images_per_sec``            ``eval_timer``: the jitted forward pass of the Trainer
                                   (``predict``'s step)
``mfu``                            model FLOPs utilisation: ``train_flops_per_step *
                                   train_images_per_sec / batch_size / peak_flops_per_sec``
                                   (FLOPs and peaks: ``peaks``)
``train_step_memory_mib``          the train step's memory on one device, from XLA's buffer
                                   assignment of the compiled step (``compiled.memory_analysis()``:
                                   arguments + outputs + temporaries - donated, i.e. aliased)
``pipeline_images_per_sec``        ``pipeline_timer``: ``data_pipeline.input_pipeline.
                                   train_dataset`` alone (random uint16 images, the paper's
                                   augmentation)
``train_from_pipeline_images_      ``pipeline_timer``: ``Trainer.train_step`` fed from that
per_sec`` / ``pipeline_overlap``   stream, timed in alternation with fixed-batch steps (host
                                   numpy, copied to the devices each step, as training does);
                                   overlap = stream / fixed (1.0: the step never waits for data)
``preprocess_images_per_sec``      ``preprocess_timer``: ``data_pipeline.preprocess.
                                   preprocess_file`` on full-size INbreast-like 16-bit DICOMs
                                   (4084 x 3328, written with pydicom to a temporary folder) by
                                   ``--preprocess_workers`` processes
``preprocess_peak_rss_mib``        peak resident memory of one such worker
                                   (``preprocess_worker``, a fresh interpreter that imports only
                                   ``data_pipeline.preprocess``, its own imports included; this
                                   process's JAX, TensorFlow and torch not): ``VmHWM`` of
                                   ``/proc/self/status``, else ``getrusage(RUSAGE_SELF).
                                   ru_maxrss`` (``..._total``: sum over workers)
``torch_train_images_per_sec``     ``torch_timer``: the same network, loss and Adam step in
                                   PyTorch (``torch_reference``), timed in alternation with the
                                   JAX step (one JAX repeat, one torch repeat, ...), so that
                                   machine load affects both alike; ``train_vs_torch`` =
                                   ``train_images_per_sec / torch_train_images_per_sec``
=================================  ==============================================================

Defaults: batch 32 on CPU and 256 on GPU/TPU; precision fp32 on CPU and bf16 on GPU/TPU (JAX:
``--precision=bf16`` of ``deepmil_jax.train``, bf16 compute with fp32 parameters; PyTorch: bf16
autocast). PyTorch uses ``channels_last`` and ``torch.set_num_threads(cpu count)``, on the GPU
when JAX runs on one and torch sees CUDA.

Load: the machine's load average is recorded with the figures. Other processes slow the two
frameworks unequally (PyTorch's OpenMP threads spin at barriers and lose far more than XLA's
thread pool when a core is taken), so under load the median ``train_vs_torch`` flatters JAX.
``*_best`` (the fastest repeat of each) estimates the idle machine; trust figures taken with a
load average below the core count.

The program is ``__main__`` (flags); ``run.run_benchmark`` is the same as a function. This
package imports nothing itself, so that its modules pull in only what they need.
"""

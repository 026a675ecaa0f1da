"""``runtime=pipeline``: every stage of a feed-forward net in its own process, joined by DNI.

Jaderberg et al. 2017, sec. 1: a module joined to the next by a synthetic gradient need not wait
for it.  Here the network is split at ``runtime.boundaries`` (cuts such as ``h2``) into ``S``
stages; stage ``s`` runs in process (rank) ``s`` and talks to its neighbours with
``torch.distributed`` point-to-point messages (gloo on CPU, nccl on GPU).

One step of stage ``s`` (:class:`Stage`), DNI pipeline:

1. take a batch of activations from stage ``s-1`` (stage 0 samples the data; every stage draws the
   same batches from its own sampler with the same seed, so labels are never sent, and the receive
   of the next batch is posted at once so that it arrives while this one computes);
2. forward through its blocks (interfaces inside the stage work as in the in-process run);
3. ask the boundary synthesizer for ``delta_hat = M(h_out, c)`` and backpropagate it at once:
   the stage updates without waiting for anything above it;
4. send ``h_out`` on, send the gradient that reached its input back to ``s-1`` (the bootstrapped
   target of the synthesizer below), step its optimizer;
5. whenever the gradient for an earlier batch comes back from ``s+1``, however late, regress the
   synthesizer's prediction for that batch on it.  The prediction's graph is kept on a snapshot
   of the synthesizer's weights taken at step 3, so a late target trains the synthesizer with the
   gradient it would have had then (delayed-gradient SGD).  At most ``runtime.max_inflight`` batches
   wait for their target; a stage that is that far ahead blocks.  How many steps late each target
   arrives (staleness) is logged.

With synthetic inputs (``dni=complete_unlock|complete_unlock_cdni``, sec. 3.3) the stages are
unlocked forwards too: every stage draws the same batches from its own copy of the data (same
seed), and stage ``s+1`` runs on ``h_hat = I(x)`` of the cut below without waiting for stage
``s``.  The real activation that stage ``s`` sends is only ``I``'s regression target, taken
whenever it arrives (on a snapshot of ``I``'s weights, like the synthesizer's), at most
``max_inflight`` batches late; the gradient w.r.t. ``h_hat`` goes back to stage ``s`` as its
synthesizer's target, as in :mod:`sgrun.dni.synthetic_input`.

Stochastic updates (``train.update_prob`` < 1, sec. 3.3): every stage draws every layer group's
coin from the in-process run's generator and drops the gradients of its own skipped groups; a
boundary synthesizer or input model whose group was skipped at the step of its prediction is left
alone when that prediction's target arrives.

The last stage computes the loss and its ordinary backward.  With ``dni=none`` the same split is
trained by plain backprop across the processes (the locked baseline): a stage sends ``h_out`` and
waits for its gradient before it updates.  With ``dni.mode=train_only`` it is locked the same way
but the synthesizers still run and learn from the true gradient: the DNI pipeline's compute, with
the locking as the only difference.

``runtime.schedule=gpipe|1f1b`` (with ``dni=none``) trains the same split as it is usually done:
backprop with ``runtime.microbatches`` micro-batches per batch through
``torch.distributed.pipelining`` (:mod:`sgrun.pipeline.schedules`).  With one micro-batch a GPipe
run equals the in-process Bprop run bit for bit; with more it equals in-process gradient
accumulation over the same micro-batches (BatchNorm then sees each micro-batch on its own).
:mod:`sgrun.pipeline.cost` predicts the samples/s of every schedule from measured stage times.

With ``max_inflight=1`` nothing overlaps and a DNI run (with or without synthetic inputs) equals
the in-process run bit for bit (same threads per process); with ``S=1`` the pipeline is the
in-process run.

Every stage is a slice of the in-process classification task (:mod:`sgrun.tasks.classification`):
it builds the task (same seed: same weights, same batches) and uses its batch sampler, its
training step (``Classification.slice_step``: the forward and backward of ``train_step``, on the
stage's blocks, the backward of a stage below the head starting from the gradient of its output),
evaluation and final metrics.  The engine's divergence guard (:mod:`sgrun.guard`) checks each
stage's values every ``train.log_every`` steps: the loss, the boundary synthesizer's and those of
the interfaces inside the stage.  Test error is measured by stage 0 on the
assembled model at every evaluation point: every stage first waits for its outstanding targets,
then the stages' weights are gathered on rank 0, with every value each stage measured since the
last evaluation.  Rank 0 writes those as the engine does: the mean over every ``train.log_every``
steps (a late target counts at the step of its prediction).  TensorBoard tags (rank 0):
``error/test``, ``perf/samples_per_sec`` (at evaluations), ``loss/train``,
``pipeline/<cut>/staleness_mean``, ``pipeline/<cut>/staleness_max``, ``dni/<cut>/sg_loss``, and with
``train.sg_quality`` ``dni/<cut>/target_cosine`` (the per-example cosine of each synthetic gradient
to the gradient that came back for it: the true one at the last boundary, with the weights above as
they were then; a bootstrapped one below it); with synthetic inputs also
``pipeline/<cut>/input_staleness_mean|max`` and ``dni/<cut>/input_loss``.  A pipeline run keeps no
checkpoint (``checkpoint.every=0``; another value, and ``resume=``, are refused).

Launch: ``sgrun runtime=pipeline`` starts the ``S`` processes itself on this machine; across
machines start one ``sgrun runtime=pipeline ...`` per stage with ``torchrun`` (``--nnodes``,
``--node-rank``, ``--master-addr``), which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``.
"""

from sgrun.pipeline.launch import pipeline_threads, train_pipeline
from sgrun.pipeline.split import Split, balanced_boundaries, block_costs, plan_split

__all__ = ["Split", "balanced_boundaries", "block_costs", "pipeline_threads", "plan_split",
           "train_pipeline"]

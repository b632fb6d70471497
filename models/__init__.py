"""gatetune.models: dynamically gated CNNs (FBS, Gao et al., ICLR 2019) and their MAC accounting.

    from gatetune.models import build, SiteSpec, resolve_sites
    sites = {s: SiteSpec(gate=True, density=0.5, weight=1e-8) for s in resolve_sites("resnet20", "layer3")}
    net = build("resnet20", num_classes=10, in_channels=3, input_size=32, sites=sites)
    logits, gate_loss = net(x, with_gate_loss=True); loss = ce(logits, y) + gate_loss   # net(x): logits
    with net.count_macs() as m: net(x)          # m.macs, m.dense_macs, m.ratio
    with net.record_gates() as rec: net(x)      # rec.densities(), rec.density(), rec.selection_counts()
    fast = SkipNet(net); fast(x)                # channel-skipping inference (batch-1 passes, eval)
    measure_latency(net, x)["latency_ratio"]    # batch-1 CPU latency, skipping / dense
"""
from gatetune.models.errors import ModelError
from gatetune.models.sites import SiteSpec
from gatetune.models.registry import default_input, layers_table, list_models, resolve_sites, site_names
from gatetune.models import nets  # noqa: F401  (registers the networks)
from gatetune.models.gate import POLICIES, GatedConv2d, GateTap, active_count
from gatetune.models.record import GateRecorder
from gatetune.models.gated_net import GatedNet, build
from gatetune.models.inference.skip import SkipNet, dense_net, measure_latency

__all__ = ["ModelError", "SiteSpec", "GatedNet", "GatedConv2d", "GateTap", "GateRecorder", "build",
           "list_models", "site_names", "resolve_sites", "layers_table", "default_input", "active_count", "POLICIES",
           "SkipNet", "dense_net", "measure_latency"]

"""A stock grpcio client against the real sevplaced.

Run by tests/tests/python_client.rs: argv[1] is the daemon's Unix socket,
argv[2] its plaintext TCP address, argv[3] the directory of the stubs that
grpcio-tools generated from proto/. Every channel uses grpcio's default
options (no grpc.default_authority), so on the Unix socket grpc-core sends
the socket path as :authority. Calls every RPC of sevplace.v1, lists the
services through reflection v1alpha, checks health and the typed errors.
Prints one line per check and exits non-zero on the first failure.
"""

import queue
import sys
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

socket_path, tcp_addr, stubs = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, stubs)
from sevplace.v1 import sevplace_pb2 as pb  # noqa: E402
from sevplace.v1 import sevplace_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "sevplace.v1.SevplaceService"
TIMEOUT = 10


def check(what, cond, detail=""):
    if not cond:
        print(f"FAIL {what} {detail}", flush=True)
        sys.exit(1)
    print(f"ok {what}", flush=True)


def error_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return e
    return None


channel = grpc.insecure_channel(f"unix://{socket_path}")
stub = pb_grpc.SevplaceServiceStub(channel)

# Health, of the whole server and of the service.
health = health_pb2_grpc.HealthStub(channel)
for name in ["", SERVICE]:
    r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
    check(f"health {name!r} SERVING", r.status == health_pb2.HealthCheckResponse.SERVING, r)

# Reflection v1alpha: the services, and the file that defines ours.
refl = reflection_pb2_grpc.ServerReflectionStub(channel)
answers = list(
    refl.ServerReflectionInfo(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
            ]
        ),
        timeout=TIMEOUT,
    )
)
listed = {s.name for s in answers[0].list_services_response.service}
for want in [
    SERVICE,
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
]:
    check(f"reflection v1alpha lists {want}", want in listed, listed)
files = answers[1].file_descriptor_response.file_descriptor_proto
check("reflection v1alpha serves the descriptor of the service", any(SERVICE.split(".")[-1].encode() in f for f in files))

# GetHost.
host = stub.GetHost(pb.GetHostRequest(), timeout=TIMEOUT).host
check("GetHost topology", len(host.topology.online_cpus) == 128 and host.topology.l3_domains, host.topology.online_cpus)
check("GetHost agent version", host.agent_version != "")

# ListVms before anything is placed.
r = stub.ListVms(pb.ListVmsRequest(), timeout=TIMEOUT)
check("ListVms empty", r.total_size == 0 and not r.vms, r)

# WatchEvents, read on a thread while the acting calls run.
events = queue.Queue()
watch = stub.WatchEvents(pb.WatchEventsRequest(vm_id="py-1"))


def read_events():
    try:
        for e in watch:
            events.put(e.event)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            events.put(e)


reader = threading.Thread(target=read_events, daemon=True)
reader.start()

# PlaceVm: validate_only, then the placement (a pending intent: no VM runs
# on the fixture host), then an identical retry.
req = pb.PlaceVmRequest(vm_id="py-1", vcpus=2, confidential_class=pb.CONFIDENTIAL_CLASS_SEV)
dry = stub.PlaceVm(pb.PlaceVmRequest(vm_id="py-dry", vcpus=2, confidential_class=pb.CONFIDENTIAL_CLASS_SEV, validate_only=True), timeout=TIMEOUT)
check("PlaceVm validate_only", dry.validated_only and len(dry.vm.placement.cpus) == 2, dry)
placed = stub.PlaceVm(req, timeout=TIMEOUT).vm
cpus = list(placed.placement.cpus)
check("PlaceVm places 2 CPUs", len(cpus) == 2 and placed.state == pb.VM_STATE_PENDING, placed)
again = stub.PlaceVm(req, timeout=TIMEOUT).vm
check("PlaceVm retry answers identically", list(again.placement.cpus) == cpus, again)

# GetVm, ListVms.
vm = stub.GetVm(pb.GetVmRequest(vm_id="py-1"), timeout=TIMEOUT).vm
check("GetVm", vm.vm_id == "py-1" and list(vm.placement.cpus) == cpus, vm)
r = stub.ListVms(pb.ListVmsRequest(filter=pb.ListVmsFilter(states=[pb.VM_STATE_PENDING])), timeout=TIMEOUT)
check("ListVms lists py-1", r.total_size == 1 and r.vms[0].vm_id == "py-1", r)

# ScrubVm: the intent has no process yet.
e = error_of(lambda: stub.ScrubVm(pb.ScrubVmRequest(vm_id="py-1"), timeout=TIMEOUT))
check("ScrubVm without a process is FAILED_PRECONDITION", e is not None and e.code() == grpc.StatusCode.FAILED_PRECONDITION, e)

# ReleaseVm.
released = stub.ReleaseVm(pb.ReleaseVmRequest(vm_id="py-1"), timeout=TIMEOUT)
check("ReleaseVm frees the CPUs", sorted(released.released_cpus) == sorted(cpus), released)

# The events of py-1, in order.
got = []
while len(got) < 2:
    try:
        e = events.get(timeout=TIMEOUT)
    except queue.Empty:
        break
    check("WatchEvents stream", not isinstance(e, grpc.RpcError), e)
    got.append(e)
kinds = [e.WhichOneof("kind") for e in got]
check("WatchEvents placed then released", kinds == ["placed", "released"], got)
check("WatchEvents placed CPUs", list(got[0].placed.placement.cpus) == cpus, got[0])
watch.cancel()

# Typed errors.
e = error_of(lambda: stub.PlaceVm(pb.PlaceVmRequest(vm_id="py-2", vcpus=0, confidential_class=pb.CONFIDENTIAL_CLASS_SEV), timeout=TIMEOUT))
check("vcpus=0 is INVALID_ARGUMENT", e is not None and e.code() == grpc.StatusCode.INVALID_ARGUMENT, e)
check("vcpus=0 names vcpus", "vcpus" in e.details(), e.details())
details = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
check("vcpus=0 carries a BadRequest field violation for vcpus", b"vcpus" in details and b"type.googleapis.com/google.rpc.BadRequest" in details, details)
e = error_of(lambda: stub.GetVm(pb.GetVmRequest(vm_id="py-none"), timeout=TIMEOUT))
check("GetVm of an unknown VM is NOT_FOUND", e is not None and e.code() == grpc.StatusCode.NOT_FOUND, e)
channel.close()

# TCP: default options work; the socket path as authority is refused there.
tcp = grpc.insecure_channel(tcp_addr)
r = health_pb2_grpc.HealthStub(tcp).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
check("health over TCP", r.status == health_pb2.HealthCheckResponse.SERVING, r)
tcp.close()
bad = grpc.insecure_channel(tcp_addr, options=[("grpc.default_authority", socket_path)])
e = error_of(lambda: health_pb2_grpc.HealthStub(bad).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))
check("socket path as authority over TCP is refused", e is not None and e.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (e.details() or ""), e)
bad.close()
print("python client: all checks passed", flush=True)

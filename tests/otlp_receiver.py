"""A tiny OTLP/gRPC trace collector for Potluck's tracing test.

Listens on 127.0.0.1 (port from argv[2], 0 = any free one), prints
"listening <port>" once serving, and appends every span it receives to the
file argv[1] as one JSON line: trace_id, span_id, parent, name, service,
instance. Runs until killed.

Needs the PyPI packages grpcio and opentelemetry-proto.
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def resource_attribute(resource, key):
    for kv in resource.attributes:
        if kv.key == key:
            return kv.value.string_value
    return ""


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for rs in request.resource_spans:
            service = resource_attribute(rs.resource, "service.name")
            instance = resource_attribute(rs.resource, "service.instance.id")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "name": span.name,
                                "service": service,
                                "instance": instance,
                            }
                        )
                    )
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    path = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(path), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening {bound}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()

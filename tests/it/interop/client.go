// A Go client of proto/api.proto, built from Debian's packages (grpc-go and protoc-gen-go), that
// dials berthd as the 2016 containerd `ctr` dialed its daemon: the socket path as the target,
// with a unix dialer, so grpc-go sends that path as :authority. It checks the semantics and error
// codes of every RPC, as client.py does, then dials again the way grpc-go's docs say
// ("unix://" + path).
//
// Usage: client SOCKET BUNDLE ID
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"reflect"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	types "berthapi"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func expect(want codes.Code, what string, err error) string {
	if err == nil {
		fail("%s: expected %v, the call succeeded", what, want)
	}
	got := status.Convert(err)
	if got.Code() != want {
		fail("%s: expected %v, got %v: %s", what, want, got.Code(), got.Message())
	}
	return got.Message()
}

func check(what string, err error) {
	if err != nil {
		fail("%s: %v", what, err)
	}
}

type seen struct {
	kind   string
	id     string
	pid    uint32
	status uint32
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: client SOCKET BUNDLE ID")
	}
	socket, bundle, id := os.Args[1], os.Args[2], os.Args[3]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Blocking until the connection is up, within the deadline, so a berthd that refuses it
	// fails the client rather than leaving it retrying.
	conn, err := grpc.DialContext(ctx, socket, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.FailOnNonTempDialError(true),
		grpc.WithDialer(func(addr string, timeout time.Duration) (net.Conn, error) {
			return net.DialTimeout("unix", addr, timeout)
		}))
	check("dial the socket path", err)
	api := types.NewAPIClient(conn)

	stream, err := api.Events(ctx, &types.EventsRequest{})
	check("Events", err)
	// The response headers arrive once berthd has subscribed this stream.
	_, err = stream.Header()
	check("Events headers", err)
	events := make(chan *types.Event, 64)
	go func() {
		for {
			event, err := stream.Recv()
			if err != nil {
				close(events)
				return
			}
			events <- event
		}
	}()
	var got []seen
	var first []*types.Event
	waitFor := func(what string, matches func(seen) bool) {
		deadline := time.After(20 * time.Second)
		for _, s := range got {
			if matches(s) {
				return
			}
		}
		for {
			select {
			case event, ok := <-events:
				if !ok {
					fail("the events stream ended before %s", what)
				}
				if event.Id != id {
					continue
				}
				s := seen{event.Type, event.Id, event.Pid, event.Status}
				got = append(got, s)
				first = append(first, event)
				if matches(s) {
					return
				}
			case <-deadline:
				fail("no %s within 20 s; saw %v", what, got)
			}
		}
	}

	create := &types.CreateContainerRequest{Id: id, BundlePath: bundle}
	created, err := api.CreateContainer(ctx, create)
	check("CreateContainer", err)
	pid := created.Pid
	if pid == 0 {
		fail("CreateContainer returned pid 0")
	}
	expect(codes.AlreadyExists, "a second create", second(api.CreateContainer(ctx, create)))
	expect(codes.InvalidArgument, "a bad id",
		second(api.CreateContainer(ctx, &types.CreateContainerRequest{Id: "-bad", BundlePath: bundle})))
	expect(codes.InvalidArgument, "a relative bundle",
		second(api.CreateContainer(ctx, &types.CreateContainerRequest{Id: id + "x", BundlePath: "rel"})))
	missing := expect(codes.NotFound, "a missing bundle",
		second(api.CreateContainer(ctx, &types.CreateContainerRequest{Id: id + "x", BundlePath: bundle + "/nope"})))
	if !strings.Contains(missing, bundle+"/nope") {
		fail("the missing bundle is not named: %s", missing)
	}

	_, err = api.Signal(ctx, &types.SignalRequest{Id: id, Pid: pid, Signal: 0})
	check("Signal 0", err)
	expect(codes.NotFound, "signal 0 to no such pid",
		second(api.Signal(ctx, &types.SignalRequest{Id: id, Pid: pid + 100000, Signal: 0})))
	expect(codes.InvalidArgument, "signal 65",
		second(api.Signal(ctx, &types.SignalRequest{Id: id, Pid: pid, Signal: 65})))
	expect(codes.NotFound, "a signal to an unknown id",
		second(api.Signal(ctx, &types.SignalRequest{Id: id + "x", Pid: pid, Signal: 9})))
	expect(codes.NotFound, "a signal to pid 1",
		second(api.Signal(ctx, &types.SignalRequest{Id: id, Pid: 1, Signal: 9})))

	statsCtx, endStats := context.WithCancel(ctx)
	stats, err := api.GetStats(statsCtx, &types.StatsRequest{Id: id})
	check("GetStats", err)
	sample, err := stats.Recv()
	check("a stats sample", err)
	if sample.Timestamp == 0 || sample.CgroupStats == nil || sample.CgroupStats.MemoryStats == nil ||
		len(sample.CgroupStats.MemoryStats.Stats) == 0 {
		fail("stats sample: %v", sample)
	}
	unknown, err := api.GetStats(statsCtx, &types.StatsRequest{Id: id + "x"})
	if err == nil {
		_, err = unknown.Recv()
	}
	expect(codes.NotFound, "stats of an unknown id", err)
	endStats()

	expect(codes.InvalidArgument, "AddProcess without args",
		second(api.AddProcess(ctx, &types.AddProcessRequest{Id: id})))
	expect(codes.NotFound, "AddProcess to an unknown id",
		second(api.AddProcess(ctx, &types.AddProcessRequest{Id: id + "x", Args: []string{"true"}})))
	added, err := api.AddProcess(ctx, &types.AddProcessRequest{
		Id: id, Args: []string{"sh", "-c", "exit 5"}, User: &types.User{},
	})
	check("AddProcess", err)
	waitFor("the exit of the added process", func(s seen) bool { return s.kind == "exit" && s.pid == added.Pid })

	expect(codes.InvalidArgument, "status frozen",
		second(api.UpdateContainer(ctx, &types.UpdateContainerRequest{Id: id, Status: "frozen"})))
	expect(codes.NotFound, "an update of an unknown id",
		second(api.UpdateContainer(ctx, &types.UpdateContainerRequest{Id: id + "x", Status: "paused"})))
	_, err = api.UpdateContainer(ctx, &types.UpdateContainerRequest{Id: id, Status: "paused"})
	check("pause", err)
	expect(codes.NotFound, "State of an unknown id",
		second(api.State(ctx, &types.StateRequest{Id: id + "x"})))
	expect(codes.NotFound, "ListCheckpoint of an unknown id",
		second(api.ListCheckpoint(ctx, &types.ListCheckpointRequest{Id: id + "x"})))
	state, err := api.State(ctx, &types.StateRequest{})
	check("State", err)
	var mine []*types.Container
	for _, c := range state.Containers {
		if c.Id == id {
			mine = append(mine, c)
		}
	}
	if len(mine) != 1 || mine[0].Status != "paused" || mine[0].BundlePath != bundle ||
		len(mine[0].Processes) == 0 || mine[0].Processes[0].Pid != pid || !reflect.DeepEqual(mine[0].Processes[0].Args, []string{"sleep", "1000"}) {
		fail("State: %v", mine)
	}
	if state.Machine == nil || state.Machine.Cpus == 0 || state.Machine.Memory == 0 {
		fail("State's machine: %v", state.Machine)
	}

	listed, err := api.ListCheckpoint(ctx, &types.ListCheckpointRequest{Id: id})
	check("ListCheckpoint", err)
	if len(listed.Checkpoints) != 0 {
		fail("checkpoints: %v", listed.Checkpoints)
	}
	expect(codes.NotFound, "delete a missing checkpoint",
		second(api.DeleteCheckpoint(ctx, &types.DeleteCheckpointRequest{Id: id, Name: "none"})))
	expect(codes.InvalidArgument, "delete a checkpoint without a name",
		second(api.DeleteCheckpoint(ctx, &types.DeleteCheckpointRequest{Id: id, Name: ""})))

	_, err = api.UpdateContainer(ctx, &types.UpdateContainerRequest{Id: id, Status: "running", Signal: 9})
	check("resume and kill", err)
	waitFor("the exit of the init", func(s seen) bool { return s.kind == "exit" && s.pid == pid })
	want := []seen{
		{"start-container", id, pid, 0},
		{"start-process", id, added.Pid, 0},
		{"exit", id, added.Pid, 5},
		{"pause", id, pid, 0},
		{"resume", id, pid, 0},
		{"exit", id, pid, 137},
	}
	if !reflect.DeepEqual(got, want) {
		fail("events: %v, want %v", got, want)
	}
	if first[0].BundlePath != bundle || first[1].Process == nil ||
		!reflect.DeepEqual(first[1].Process.Args, []string{"sh", "-c", "exit 5"}) {
		fail("event details: %v %v", first[0], first[1])
	}
	check("close", conn.Close())

	// As grpc-go's docs dial a unix socket today.
	docs, err := grpc.DialContext(ctx, "unix://"+socket, grpc.WithInsecure())
	check("dial unix://", err)
	_, err = types.NewAPIClient(docs).State(ctx, &types.StateRequest{})
	check("State over unix://", err)
	check("close", docs.Close())
	fmt.Printf("interop ok: every RPC answered as specified (grpc-go %s)\n", grpc.Version)
}

// second returns the error of a call's (response, error) pair.
func second(_ interface{}, err error) error {
	return err
}

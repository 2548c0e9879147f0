"""Many processes, one job: under torchrun (`torchrun --nproc-per-node K -m minledits sweep|batch ...`) every
process runs the same command, takes its own share of the cells or jobs, and process 0 writes what needs them all.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; init() joins the group (nccl on CUDA,
one GPU per process: cuda:LOCAL_RANK; gloo on CPU). Without torchrun (WORLD_SIZE unset or 1) nothing is
started and the process is rank 0 of 1. The processes share the output folder (on many machines: a shared
file system), and each plans from what is on disk before any of them writes (a barrier).
"""
import os

import torch
import torch.distributed as dist


def init(device: str = "auto") -> tuple[int, int]:
    """(rank, world size), joining torchrun's group on the first call."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] alone)."""
    if not dist.is_initialized():
        return [obj]
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, obj)
    return found


def done() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
